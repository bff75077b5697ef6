"""``/dashboard``: the admin's view of the loop, served by the backend (server-rendered, no build step).

What it shows, per project: the model serving it and its lineage, the held-out error of every
version the project trained (the learning curve, as an inline SVG), corrections since the last
training against the threshold, running and queued jobs with stage, step, loss and ETA, recent
outcomes with the gate's reason, and the job queue's depth. What an admin can do from it: train
now, promote a version, roll a project back, download an export; each asks for confirmation in
the browser and carries a CSRF token (basic auth alone would let any page a logged-in admin
visits post the form). The routes sit behind the backend's basic auth like every other route.

The blueprint lives here, not in :mod:`ml_backend.app`, because its actions reach the job queue
and Label Studio (:mod:`loopscribe.jobs`, :mod:`loopscribe.labelstudio`); ``loopscribe.wsgi``
registers it.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flask import Blueprint, Response, abort, after_this_request, redirect, render_template, request, send_file, url_for
from werkzeug.wrappers import Response as WerkzeugResponse

from ml_backend.errors import LoopscribeError
from ml_backend.ledger import Ledger
from ml_backend.live import live_model
from ml_backend.model_store import resolve_base
from ml_backend.registry import GLOBAL, ModelVersion, Registry, project_of, scope_of
from ml_backend.settings import Settings
from ml_backend.training_jobs import Job

log = logging.getLogger(__name__)

CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 420, 160, 28
EXPORT_FORMATS = ("jsonl", "hf", "nemo", "srt", "vtt")


@dataclass
class CurvePoint:
    x: float
    y: float
    version: str
    error: float
    status: str


@dataclass
class ProjectView:
    id: int
    serving: str
    lineage: str  # project-N, global or base
    corrections_since: int
    threshold: int
    ledger: dict[str, int]
    versions: list[ModelVersion] = field(default_factory=list)
    active: list[Job] = field(default_factory=list)
    recent: list[Job] = field(default_factory=list)
    curve: list[CurvePoint] = field(default_factory=list)
    baseline_y: float | None = None  # the base model's held-out error, as the first training measured it
    baseline: float | None = None
    y_max: float = 1.0


def learning_curve(versions: list[ModelVersion]) -> tuple[list[CurvePoint], float | None, float | None, float]:
    """Chart coordinates of every evaluated version, oldest left: (points, baseline y, baseline error, y max)."""
    evaluated = [v for v in versions if v.error_after is not None]
    if not evaluated:
        return [], None, None, 1.0
    baseline = evaluated[0].error_before
    errors = [v.error_after for v in evaluated if v.error_after is not None] + ([baseline] if baseline else [])
    y_max = max(0.05, max(errors) * 1.15)
    inner_w, inner_h = CHART_WIDTH - 2 * CHART_PAD, CHART_HEIGHT - 2 * CHART_PAD

    def y_of(error: float) -> float:
        return round(CHART_PAD + inner_h * (1 - error / y_max), 1)

    step = inner_w / max(1, len(evaluated) - 1)
    points = [CurvePoint(round(CHART_PAD + (i * step if len(evaluated) > 1 else inner_w / 2), 1),
                         y_of(v.error_after), v.version, v.error_after, v.status)
              for i, v in enumerate(evaluated) if v.error_after is not None]
    return points, (y_of(baseline) if baseline is not None else None), baseline, y_max


def project_views(settings: Settings, ledger: Ledger, registry: Registry, projects: list[int]) -> list[ProjectView]:
    base = resolve_base(settings)
    views = []
    for project in projects:
        serving = live_model(settings, project)
        jobs = ledger.jobs.list(project=project, limit=8)
        versions = [v for v in registry.list(project) if v.base_version == base.version]
        view = ProjectView(project, serving.version, serving.scope, ledger.jobs.corrections_since_training(project),
                           settings.retrain_min_corrections, ledger.corrections.counts(project), versions,
                           [j for j in jobs if j.state in ("queued", "running")],
                           [j for j in jobs if j.state not in ("queued", "running")][:5])
        view.curve, view.baseline_y, view.baseline, view.y_max = learning_curve(versions)
        views.append(view)
    return views


def blueprint(settings: Settings, *, queue_depth: Callable[[], dict] | None = None,
              request_training: Callable[[int], tuple[Job, bool]] | None = None,
              export: Callable[[int, str, Path], object] | None = None) -> Blueprint:
    """The dashboard routes. ``request_training(project)`` queues a job, ``export(project, format, out)``
    writes an export folder, ``queue_depth()`` reports the job queue; each is left out when not given."""
    pages = Blueprint("dashboard", __name__, template_folder="templates")
    csrf_key = secrets.token_bytes(32)  # per process: a form from another process asks to reload

    def csrf_token() -> str:
        return hmac.new(csrf_key, b"dashboard", "sha256").hexdigest()

    def check_csrf() -> None:
        if not hmac.compare_digest(request.form.get("csrf", ""), csrf_token()):
            abort(403, "stale or missing form token: reload the dashboard and try again")

    def done(message: str) -> WerkzeugResponse:
        log.info("dashboard: %s", message)
        return redirect(url_for("dashboard.show", done=message[:300]), code=303)

    def project_field() -> int:
        try:
            return int(request.form["project"])
        except (KeyError, ValueError):
            abort(400, "project: expected an integer")

    @pages.get("/dashboard")
    def show():
        ledger, registry = Ledger(settings.ledger_url), Registry.open(settings)
        base = resolve_base(settings)
        projects = sorted(set(ledger.projects()) | {v.project for v in registry.list() if v.project is not None})
        default = live_model(settings)
        return render_template(
            "dashboard.html", projects=project_views(settings, ledger, registry, projects), base=base.version,
            default=default, pointers=registry.pointers(), history=list(reversed(registry.history()))[:10],
            queue=queue_depth() if queue_depth else None, csrf=csrf_token(), done=request.args.get("done"),
            now=time.time(), chart=(CHART_WIDTH, CHART_HEIGHT, CHART_PAD), formats=EXPORT_FORMATS,
            can_train=request_training is not None, can_export=export is not None, GLOBAL=GLOBAL)

    @pages.post("/dashboard/train")
    def train():
        check_csrf()
        project = project_field()
        if request_training is None:
            abort(501, "this backend has no job queue wired in")
        job, created = request_training(project)
        return done(f"training job {job.id} for project {project} " + ("queued" if created else
                                                                        "was already queued or running"))

    @pages.post("/dashboard/promote")
    def promote():
        check_csrf()
        version, scope = request.form.get("version", ""), request.form.get("scope") or None
        registry = Registry.open(settings)
        try:
            target = scope or registry.get(version).scope
            previous = registry.promote(version, resolve_base(settings).version, scope=target)
        except LoopscribeError as exc:
            abort(400, str(exc))
        return done(f"{version} is live in {target} (was {previous}); re-score with `loopscribe predict "
                    f"--project N --queue`")

    @pages.post("/dashboard/rollback")
    def rollback():
        check_csrf()
        scope = request.form.get("scope") or ""
        try:
            project_of(scope)  # validates
            now = Registry.open(settings).rollback(resolve_base(settings).version, scope=scope)
        except LoopscribeError as exc:
            abort(400, str(exc))
        return done(f"{scope} rolled back to {now}")

    @pages.post("/dashboard/export")
    def download():
        check_csrf()
        project, fmt = project_field(), request.form.get("format", "jsonl")
        if fmt not in EXPORT_FORMATS:
            abort(400, f"format: one of {', '.join(EXPORT_FORMATS)}")
        if export is None:
            abort(501, "this backend has no Label Studio export wired in")
        work = Path(tempfile.mkdtemp(prefix="dashboard-export-", dir=settings.home))

        @after_this_request
        def clean(response: Response) -> Response:
            shutil.rmtree(work, ignore_errors=True)  # send_file has the archive open already
            return response

        try:
            export(project, fmt, work / "export")
        except LoopscribeError as exc:
            abort(400, str(exc))
        archive = shutil.make_archive(str(work / f"project-{project}-{fmt}"), "zip", work / "export")
        return send_file(archive, mimetype="application/zip", as_attachment=True,
                         download_name=f"loopscribe-project-{project}-{fmt}.zip")

    @pages.app_template_filter("ago")
    def ago(timestamp: float | None) -> str:
        if not timestamp:
            return ""
        seconds = max(0, time.time() - timestamp)
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"{seconds / size:.0f} {unit} ago"
        return f"{seconds:.0f} s ago"

    pages.add_app_template_global(scope_of, "scope_of")
    return pages
