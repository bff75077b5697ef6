"""The admin dashboard: what it shows, its confirmed and CSRF-protected actions, and how a real browser renders it.

The registry and the ledger are real (files and SQLite under a temporary home); the model is
never loaded (the page reads versions, pointers and jobs only). The browser is Debian's
Chromium, headless, installed by ``./scripts/test``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from test_ledger import annotation_event

from loopscribe import dashboard
from ml_backend.app import create_app
from ml_backend.ledger import Ledger
from ml_backend.model_store import resolve_base
from ml_backend.registry import ModelVersion, Registry

AUTH = ("admin", "dashboard-secret")
PROJECT = 7  # the ledger fixtures' project


@pytest.fixture
def home(tmp_path, settings):
    (tmp_path / "models").symlink_to(settings.models_dir)
    s = replace(settings, home=tmp_path, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1], retrain_min_corrections=50)
    base = resolve_base(s)
    registry = Registry(tmp_path)
    for n, (after, status) in enumerate([(0.40, "promote"), (0.43, "rejected"), (0.31, "promote")], 1):
        adapter = tmp_path / f"adapter{n}"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(b"x")
        version = f"{base.version}-lora00{n}-test"
        registry.add(ModelVersion(version=version, base_version=base.version, base_model=base.path,
                                  parent=base.version, project=PROJECT, created_at=f"2026-11-2{n}T10:00:00Z",
                                  train_size=10 * n, heldout_size=12, error_before=0.45, error_after=after,
                                  report={"decision": f"gate says {status}"}), adapter)
        if status == "promote":
            registry.promote(version, base.version)
        else:
            registry.update(version, status=status)
    ledger = Ledger(s.ledger_url)
    done, _ = ledger.jobs.request(PROJECT, "threshold")
    ledger.jobs.claim(done.id, "host:1")
    ledger.jobs.finish(done.id, "rejected", reason="not knowably better: gain +0.010, 95% bound -0.020")
    running, _ = ledger.jobs.request(PROJECT, "cli")
    ledger.jobs.claim(running.id, "host:1")
    ledger.jobs.progress(running.id, stage="training", step=12, total_steps=40, loss=0.734, eta_s=95)
    for i in range(3):  # arrived while the job runs: they count towards the next one
        ledger.corrections.record(annotation_event("ANNOTATION_CREATED", 100 + i, 200 + i, f"fixed words {i}",
                                                   "2026-11-24T10:00:00Z", predicted="wrong words"))
    return s


def make_app(s, queued: list | None = None):
    def request_training(project: int):
        job, created = Ledger(s.ledger_url).jobs.request(project, "dashboard")
        assert job is not None
        if queued is not None:
            queued.append(job.id)
        return job, created

    app = create_app(s, engine=None)
    app.register_blueprint(dashboard.blueprint(s, queue_depth=lambda: {"backend": "sqlite", "pending": 2,
                                                                      "scheduled": 0},
                                               request_training=request_training))
    return app


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, "no form token on the page"
    return found.group(1)


def test_dashboard_needs_basic_auth(home):
    client = make_app(home).test_client()
    assert client.get("/dashboard").status_code == 401
    assert client.get("/dashboard", auth=("admin", "wrong")).status_code == 401
    assert client.get("/dashboard", auth=AUTH).status_code == 200


def test_dashboard_shows_the_lineage_curve_corrections_and_jobs(home):
    page = make_app(home).test_client().get("/dashboard", auth=AUTH).get_data(as_text=True)
    live = f"{resolve_base(home).version}-lora003-test"
    assert f'<code class="serving">{live}</code> (project-{PROJECT})' in page
    assert '<span class="corrections">3</span>' in page and '<span class="threshold">50</span>' in page
    assert "step 12/40" in page and "loss 0.734" in page and "ETA 95 s" in page
    assert "not knowably better: gain +0.010" in page  # the gate's reason of the finished job
    points = re.findall(r'<circle class="version-point"[^>]*data-error="([0-9.]+)"', page)
    assert points == ["0.4000", "0.4300", "0.3100"]  # every version's held-out error, oldest first
    assert 'class="baseline"' in page and "base model 0.450" in page
    assert '<span id="queue-pending">2</span>' in page


def test_actions_need_the_form_token_and_change_only_what_they_say(home):
    queued: list[int] = []
    client = make_app(home, queued).test_client()
    page = client.get("/dashboard", auth=AUTH).get_data(as_text=True)
    token = csrf_of(page)
    assert client.post("/dashboard/train", data={"project": PROJECT}, auth=AUTH).status_code == 403  # no token
    answer = client.post("/dashboard/train", data={"project": PROJECT, "csrf": token}, auth=AUTH)
    assert answer.status_code == 303 and "already queued or running" in answer.headers["Location"].replace("+", " ")
    assert client.post("/dashboard/train", data={"project": "x", "csrf": token}, auth=AUTH).status_code == 400

    registry, base = Registry.open(home), resolve_base(home).version
    answer = client.post("/dashboard/rollback", data={"scope": f"project-{PROJECT}", "csrf": token}, auth=AUTH)
    assert answer.status_code == 303 and registry.live(base, PROJECT).version == f"{base}-lora001-test"
    answer = client.post("/dashboard/promote", data={"version": f"{base}-lora002-test", "csrf": token}, auth=AUTH)
    assert answer.status_code == 303 and registry.live(base, PROJECT).version == f"{base}-lora002-test"
    assert registry.live(base) is None and registry.live(base, PROJECT + 1) is None  # no other lineage changed
    bad = client.post("/dashboard/promote", data={"version": "nope", "csrf": token}, auth=AUTH)
    assert bad.status_code == 400 and "no model version" in bad.get_json()["error"]
    done = client.get(answer.headers["Location"], auth=AUTH).get_data(as_text=True)
    assert f"{base}-lora002-test is live in project-{PROJECT}" in done


@pytest.fixture
def served_dashboard(home):
    """The dashboard on a real loopback HTTP server (werkzeug), without auth: Chromium cannot send it headless."""
    from werkzeug.serving import make_server

    s = replace(home, basic_auth_user="", basic_auth_pass="")
    server = make_server("127.0.0.1", 0, make_app(s), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_real_browser_renders_the_chart_and_the_numbers(served_dashboard, home, tmp_path):
    from browser import Browser

    browser = Browser()
    try:
        browser.goto(f"{served_dashboard}/dashboard")
        dom = browser.evaluate("document.documentElement.outerHTML")
        shot = browser.screenshot(tmp_path / "dashboard.png")
    finally:
        browser.close()
    assert "<svg" in dom and "learning-curve" in dom, dom[:2000]
    assert len(re.findall(r'<circle class="version-point"', dom)) == 3  # one point per evaluated version
    assert re.search(r'<polyline [^>]*points="[0-9., ]+"', dom)
    assert "step 12/40" in dom and '<span class="corrections">3</span>' in dom
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1366)
    blue = ((abs(pixels[..., 0] - 0x3b / 255) < 0.05) & (abs(pixels[..., 1] - 0x6f / 255) < 0.05)
            & (abs(pixels[..., 2] - 0xd8 / 255) < 0.05))
    assert blue.sum() > 50, "the learning curve (drawn in #3b6fd8) is not on the rendered page"
    Path(tmp_path / "dashboard.dom.html").write_text(dom)
