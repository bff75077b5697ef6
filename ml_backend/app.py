"""The Label Studio ML backend: a thin Flask layer over the engine.

Routes (the protocol Label Studio 1.23 speaks): ``GET /health``, ``POST /setup``,
``POST /predict``, ``POST /webhook``, ``GET /versions``, plus ``GET /metrics``
(Prometheus). Served by gunicorn (``loopscribe.wsgi:app`` wires in the job queue); one
process holds the model, threads serve requests. The model is the registry's live
version, hot-swapped when a new one is promoted (:mod:`ml_backend.live`).

``/webhook`` folds annotation events into the corrections ledger and, when a project's
corrections reach ``RETRAIN_MIN_CORRECTIONS`` (or Label Studio sends ``START_TRAINING``),
queues a training job: a few milliseconds of SQLite, then the answer. Label Studio waits
at most one second.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Callable

from flask import Flask, Response, jsonify, request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from .audio import AudioDecodeError, duration
from .fetch import AudioFetcher, AudioFetchError, load_task_audio
from .label_config import LabelConfigError, parse_label_config
from .ledger import Ledger
from .live import LiveEngine
from .payloads import (
    TRAIN_ACTION,
    WEBHOOK_SECRET_HEADER,
    PayloadError,
    PredictRequest,
    PredictTask,
    SetupRequest,
    WebhookEvent,
    parse,
    parse_task,
)
from .predictions import to_prediction
from .projects import ProjectDirectory, ProjectState
from .safelog import clip
from .settings import Settings
from .splits import ahead_cutoff, serving_score
from .transcription import TranscribeOptions, Transcriber

log = logging.getLogger(__name__)

OPEN_ROUTES = {"/health"}  # liveness probes need no credentials
FETCH_THREADS = 4
AUTO_CHUNK = 32  # tasks fetched and decoded at a time when WHISPER_BATCH_SIZE is 0 (the decoder packs their windows)
RETRY_AFTER_S = 5


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of any client string (non-ASCII included) with a configured secret."""
    encode = lambda v: v.encode("utf-8", "backslashreplace")  # noqa: E731
    return hmac.compare_digest(encode(given or ""), encode(expected))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loopscribe_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("loopscribe_request_seconds", "Request latency", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.tasks = Counter("loopscribe_predict_tasks", "Tasks predicted", ["outcome"], registry=r)
        self.audio_seconds = Counter("loopscribe_audio_seconds", "Audio seconds transcribed", registry=r)
        self.webhooks = Counter("loopscribe_webhook_events", "Webhook events received", ["action"], registry=r)
        self.model = Gauge("loopscribe_model_info", "Live model version", ["version"], registry=r)


class PredictionService:
    """Fetch task audio, transcribe the batch, shape Label Studio results. One bad task never fails a batch."""

    def __init__(self, settings: Settings, engine: Transcriber | None = None):
        self.settings = settings
        self.fetcher = AudioFetcher(settings)
        self.live = LiveEngine(settings, engine)
        self.projects = ProjectDirectory(self.fetcher.auth, self.fetcher.session)

    def model_version(self, project: int | None = None) -> str:
        """``project``'s live version, answered without loading the model: Label Studio gives /setup 3 seconds."""
        return self.live.version(project)

    def warm_up(self) -> threading.Thread:
        """Load the model in the background so the first /predict does not pay for it; then keep
        watching the registry so a promoted version is loaded before it is asked for."""
        # transformers' lazy imports are not thread-safe: a request importing it while the warm-up thread does
        # failed with "cannot import name 'WhisperFeatureExtractor'". Import here, before any request thread.
        import transformers  # noqa: F401
        from transformers import (  # noqa: F401
            WhisperFeatureExtractor,
            WhisperForConditionalGeneration,
            WhisperTokenizer,
        )

        from .text import normalize

        normalize("warm up")  # the ledger's normalizer, ready before the first webhook

        def load() -> None:
            self.live.get()
            self.live.watch()

        thread = threading.Thread(target=load, name="engine-warm-up", daemon=True)
        thread.start()
        return thread

    def predict(self, tasks: list[Any], label_config: str, metrics: Metrics | None = None,
                project: int | None = None) -> list[dict]:
        """One result per task, in order, each from the model live for the task's project (``project``
        when a task does not say). A malformed task, or one whose audio cannot be fetched or decoded, gets an
        empty result and a log line. Projects are never mixed in one batch, and tasks are decoded and
        transcribed ``WHISPER_BATCH_SIZE`` (``AUTO_CHUNK`` when 0) at a time, so a request holds at most one
        chunk of decoded audio."""
        config = parse_label_config(label_config)
        options = TranscribeOptions.for_project(config.language_values)  # only the project's languages
        parsed = [self._parse(i, raw) for i, raw in enumerate(tasks)]
        default_version = self.model_version(project)  # once: it reads the registry's pointers
        results: list[dict] = [{"result": [], "score": 0.0, "model_version": default_version} for _ in tasks]
        by_project: dict[int | None, list[int]] = {}
        for i, task in enumerate(parsed):
            if task is not None:
                by_project.setdefault(task.project if task.project is not None else project, []).append(i)
        if metrics:
            metrics.tasks.labels("error").inc(len(tasks) - sum(map(len, by_project.values())))
        chunk = self.settings.batch_size or AUTO_CHUNK
        for task_project, indices in by_project.items():
            engine = self.live.get(task_project)
            ahead = self._ahead(task_project)
            for i in indices:
                results[i]["model_version"] = engine.model_version
            for start in range(0, len(indices), chunk):
                part = indices[start:start + chunk]
                with ThreadPoolExecutor(FETCH_THREADS) as pool:
                    loaded = list(pool.map(lambda i: self._try_load(parsed[i], config.audio_key), part))
                good = [(i, clip_) for i, clip_ in zip(part, loaded) if clip_ is not None]
                transcripts = engine.transcribe([c for _, c in good], options) if good else []
                for (i, _), t in zip(good, transcripts):
                    task = parsed[i]
                    score = serving_score(t.confidence, task_project, task.id if task else None,
                                          self.settings.heldout_fraction, ahead)
                    results[i] = to_prediction(t, config, self.settings.unsure_word_probability, score)
                if metrics:
                    metrics.tasks.labels("ok").inc(len(good))
                    metrics.tasks.labels("error").inc(len(part) - len(good))
                    metrics.audio_seconds.inc(sum(duration(c) for _, c in good))
        return results

    def _ahead(self, project: int | None) -> float:
        """The project's :func:`~ml_backend.splits.ahead_cutoff`, the same one ``loopscribe predict`` sets."""
        s = self.settings
        if project is None:  # no project: every task scores in the pool band
            return s.heldout_ahead
        return ahead_cutoff(project, self.projects.size(project), lambda: self.projects.task_ids(project),
                            s.heldout_fraction, s.heldout_ahead, s.heldout_ahead_tasks)

    @staticmethod
    def _parse(index: int, raw: Any) -> PredictTask | None:
        try:
            return parse_task(raw)
        except PayloadError as exc:
            log.warning("task #%d of the request: no prediction: %s", index, exc)
            return None

    def _try_load(self, task: PredictTask | None, key: str):
        if task is None:
            return None
        try:
            return load_task_audio(self.fetcher, task.id, task.data, key)
        except (AudioFetchError, AudioDecodeError) as exc:
            log.warning("task %s: no prediction: %s", task.id, exc)
        except Exception:  # a defect on one task must not cost the others their predictions
            log.exception("task %s: no prediction: unexpected error", task.id)
        return None


def create_app(settings: Settings | None = None, engine: Transcriber | None = None, *, warm_up: bool = False,
               enqueue_job: Callable[[int], None] | None = None) -> Flask:
    """``enqueue_job(job_id)`` hands a queued training job to the worker; without it, jobs wait in
    the ledger until a worker starts (the worker re-enqueues queued jobs on start-up)."""
    settings = settings or Settings.from_env()
    service = PredictionService(settings, engine)
    if warm_up:
        service.warm_up()
    metrics = Metrics()
    ledger = Ledger(settings.ledger_url)
    projects = service.projects
    predict_slots = threading.BoundedSemaphore(max(1, settings.max_concurrent_predicts))
    events_file = settings.home / "webhooks" / "events.jsonl"
    app = Flask(__name__)
    app.config["service"] = service
    app.config["metrics"] = metrics
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes

    def error(status: int, message: str, **headers: str) -> tuple[Response, int]:
        response = jsonify(error=message)
        response.headers.update(headers)
        return response, status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(OperationalError)
    def database_unavailable(exc: OperationalError):  # PostgreSQL unreachable, or SQLite locked past its timeout
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        log.error("%s %s: the ledger's database is unavailable: %s", request.method, clip(request.path), clip(reason))
        return error(503, "the ledger's database is unavailable; retry", **{"Retry-After": str(RETRY_AFTER_S)})

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # the last line of defence: logged with its traceback, no details out
        log.exception("%s %s failed", request.method, clip(request.path))
        return error(500, "internal error (logged)")

    @app.before_request
    def authenticate():
        request.environ["loopscribe.start"] = time.perf_counter()
        if request.content_length is not None and request.content_length > settings.max_request_bytes:
            return error(413, f"request body over MAX_REQUEST_BYTES ({settings.max_request_bytes})")
        if request.path in OPEN_ROUTES or request.path == "/webhook":
            return None
        if settings.basic_auth_user and settings.basic_auth_pass:
            auth = request.authorization
            ok = auth is not None and same_secret(auth.username, settings.basic_auth_user) \
                and same_secret(auth.password, settings.basic_auth_pass)
            if not ok:
                return error(401, "authentication required", **{"WWW-Authenticate": 'Basic realm="loopscribe"'})
        return None

    @app.after_request
    def record(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        start = request.environ.get("loopscribe.start")
        if start is not None:
            metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    def json_body() -> Any:
        body = request.get_json(silent=True)
        if body is None:
            raise PayloadError("expected a JSON object")
        return body

    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class="WhisperEngine", model_dir=settings.whisper_model)

    @app.post("/setup")
    def setup():
        try:
            body = parse(SetupRequest, request.get_json(silent=True) or {}, "/setup")
            if body.schema_:
                parse_label_config(body.schema_)
            project = body.project_id
        except (PayloadError, LabelConfigError) as exc:
            return error(400, str(exc))
        version = service.model_version(project)  # this project's lineage: its uncertainty sampling ranks by it
        metrics.model.labels(version).set(1)
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        try:
            body = parse(PredictRequest, json_body(), "/predict")
        except PayloadError as exc:
            return error(400, f'{exc} (expected {{"tasks": [...], "label_config": "<View>…"}})')
        if not body.config_xml:
            return error(400, "request has no label_config")
        if len(body.tasks) > settings.max_tasks_per_request:
            return error(413, f"{len(body.tasks)} tasks in one request, over MAX_TASKS_PER_REQUEST "
                              f"({settings.max_tasks_per_request}); use `loopscribe predict` for bulk work")
        try:
            parse_label_config(body.config_xml)
            project = body.project_id
        except (LabelConfigError, PayloadError) as exc:
            return error(400, str(exc))
        if not predict_slots.acquire(blocking=False):
            return error(503, f"busy: {settings.max_concurrent_predicts} predictions in progress "
                              f"(MAX_CONCURRENT_PREDICTS); retry", **{"Retry-After": str(RETRY_AFTER_S)})
        try:
            return jsonify(results=service.predict(body.tasks, body.config_xml, metrics, project))
        finally:
            predict_slots.release()

    @app.post("/webhook")
    def webhook():
        if settings.webhook_secret and not same_secret(request.headers.get(WEBHOOK_SECRET_HEADER),
                                                       settings.webhook_secret):
            return error(401, f"missing or wrong {WEBHOOK_SECRET_HEADER} header")
        try:
            body = json_body()
            event = parse(WebhookEvent, body, "webhook")
            event.check_clock(datetime.now(UTC), settings.webhook_max_future_seconds)
        except PayloadError as exc:
            return error(400, f"{exc} (expected a Label Studio webhook event)")
        metrics.webhooks.labels(event.metric_action).inc()
        project = event.project.id if event.project is not None else None
        if project is not None and projects.state(project) is ProjectState.MISSING:
            log.warning("webhook %s for project %d, which Label Studio does not have: ignored",
                        event.metric_action, project)
            return jsonify(status="ignored", reason=f"Label Studio has no project {project}"), 200
        events_file.parent.mkdir(parents=True, exist_ok=True)  # audit log of accepted events, as sent
        with open(events_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"received_at": time.time(), "event": body}, ensure_ascii=False) + "\n")
        recorded = ledger.corrections.record(event.to_ledger())
        job, created = None, False
        if project is not None and event.action == TRAIN_ACTION:
            job, created = ledger.jobs.request(project, "label-studio")
        elif project is not None and recorded.changed and settings.retrain_min_corrections > 0:
            job, created = ledger.jobs.request(project, "threshold",
                                                   min_corrections=settings.retrain_min_corrections)
        if created and enqueue_job is not None:
            enqueue_job(job.id)
        answer: dict[str, Any] = {"status": "ok", "changed": recorded.changed}
        if job is not None:
            answer["job"] = {"id": job.id, "state": job.state, "queued_now": created}
        return jsonify(answer), 201

    @app.get("/versions")
    def versions():
        """``?project=N``: that project's live version first, then its lineage's earlier ones. Always also
        ``projects``: which version serves which project (``global`` for the rest)."""
        from .registry import GLOBAL, Registry, project_of

        try:
            project = int(request.args["project"]) if "project" in request.args else None
        except ValueError:
            return error(400, "project: expected an integer")
        registry = Registry.open(settings)
        live = service.model_version(project)
        fine_tuned = [v.version for v in registry.list(project) if v.status in ("live", "retired")]
        served = [service.live.served_version(v) for v in reversed(fine_tuned)]
        lineages = {GLOBAL: service.model_version(None)}
        for pointer in registry.pointers():
            if pointer["scope"] != GLOBAL:
                lineages[pointer["scope"]] = service.model_version(project_of(pointer["scope"]))
        return jsonify(versions=[live] + [v for v in served if v != live], projects=lineages)

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    return app
