"""Robustness and security probes of the ML backend: what a careless client or an attacker sends.

Each test pins one defect found by probing the running backend (its fix named in the test's
docstring) or one guarantee that already held. Three layers:

* the Flask app with a stand-in engine (fast): payload validation, auth, limits, fetch rules;
* the app with the real Whisper base (slow): a malformed task in a real batch;
* the real served backend, gunicorn behind nginx as ``up`` runs it (slow): slow clients, load.

Label Studio is stood in for by a loopback HTTP server that records every request it gets, so
a test can say "the backend never asked for /api/…". All traffic stays on 127.0.0.1, and every
loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from conftest import QuietHandler

from ml_backend.app import WEBHOOK_SECRET_HEADER, create_app
from ml_backend.audio import AudioDecodeError, decode_audio
from ml_backend.fetch import AudioFetcher, AudioFetchError
from ml_backend.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config.xml").read_text()
TOKEN = "standin-token"
SECRET = "s3cret"
PROJECTS = {1, 2}  # the projects the stand-in Label Studio has


def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, 16000, subtype="PCM_16", format="WAV")
    return out.getvalue()


class StandIn(QuietHandler):
    """Label Studio's media and project routes as the backend uses them; records every path asked for."""

    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}
    seen: list[str] = []
    hold = threading.Event()  # /data/upload/1/slow.wav waits for it

    def do_GET(self):
        StandIn.seen.append(self.path)
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            return self._send(401, b"auth required")
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if self.path.startswith("/api/projects/"):
            project = self.path.split("/")[3]
            return self._send(200, b"{}") if project.isdigit() and int(project) in PROJECTS else self._send(404, b"{}")
        if self.path == "/data/upload/1/slow.wav":
            StandIn.hold.wait(timeout=30)
        data = self.files.get(self.path)
        return self._send(200, data) if data is not None else self._send(404, b"not found")


class OtherHost(QuietHandler):
    """An allowed audio host (no Label Studio token may ever reach it)."""

    def do_GET(self):
        body = StandIn.files["/data/upload/1/comfy.wav"]
        leaked = self.headers.get("Authorization")
        self.send_response(500 if leaked else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def comfy(shared_audio) -> np.ndarray:
    return decode_audio(shared_audio / "comfyui_en.mp3")


@pytest.fixture(scope="module")
def standin(comfy):
    StandIn.files = {"/data/upload/1/comfy.wav": wav_bytes(comfy), "/data/upload/1/slow.wav": b"not audio" * 10}
    for i in range(40):  # distinct audio per request: the engine's cache must not answer a load test
        samples = comfy.copy()
        samples[:16] += np.float32(i + 1) * 4e-3
        StandIn.files[f"/data/upload/1/load-{i}.wav"] = wav_bytes(samples)
    server, url = serve(StandIn)
    other, other_url = serve(OtherHost)
    StandIn.redirects = {
        "/data/upload/1/to-api": "/api/projects/1/",
        "/data/upload/1/to-other": f"{other_url}/x.wav",
        "/tasks/7/presign/?fileuri=czM6Ly9iL2Eud2F2": "http://unlisted.invalid/a.wav",
        "/tasks/8/presign/?fileuri=czM6Ly9iL2Eud2F2": f"{other_url}/a.wav",
    }
    yield url, other_url
    server.shutdown()
    other.shutdown()


class StandInEngine:
    """For routes that never transcribe (validation, auth, limits): any call to transcribe is a test failure."""

    model_version = "standin-1"
    quantized = False

    def transcribe(self, clips, *args, **kwargs):
        raise AssertionError("this test must not reach the model")


def app_settings(settings, tmp_path, standin, **changes):
    url, other = standin
    return replace(settings, home=tmp_path, label_studio_url=url, label_studio_api_key=TOKEN,
                   webhook_secret=SECRET, basic_auth_user="ls", basic_auth_pass="pw",
                   allowed_audio_hosts=(other.split("//")[1],), **changes)


@pytest.fixture
def client(settings, tmp_path, standin):
    return create_app(app_settings(settings, tmp_path, standin), StandInEngine()).test_client()


AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
HOOK = {WEBHOOK_SECRET_HEADER: SECRET}


def annotation_event(**annotation) -> dict:
    base = {"id": 11, "task": 5, "result": [{"type": "textarea", "from_name": "transcription", "to_name": "audio",
                                              "value": {"text": ["hello"]}}],
            "updated_at": "2026-01-01T00:00:00Z"}
    return {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": base | annotation}


# ---- 4. unauthenticated requests are 401, never 500 --------------------------------------------------------


@pytest.mark.parametrize("user, password", [("ü", "pw"), ("ls", "pässwörd"), ("ls", "\u2603"), ("\x00", "\x00")])
def test_non_ascii_basic_auth_is_401(client, user, password):
    """Defect: hmac.compare_digest on non-ASCII str raised TypeError → 500. Fix: compare UTF-8 bytes."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert client.post("/setup", json={}, headers={"Authorization": f"Basic {token}"}).status_code == 401


def test_non_ascii_webhook_secret_is_401(client):
    for given in ("s3crét", "ü" * 300, "\u2603"):
        environ = {"HTTP_X_LOOPSCRIBE_SECRET": given.encode().decode("latin-1")}  # as a WSGI server passes it
        assert client.post("/webhook", json=annotation_event(), environ_base=environ).status_code == 401


# ---- 6. /setup and /predict type errors are 400 --------------------------------------------------------------


@pytest.mark.parametrize("body", [{"schema": [1]}, {"schema": 5}, {"schema": {"x": 1}}, [1], "text", 7,
                                  {"schema": "<View><Image name='i' value='$i'/></View>"}, {"project": [1]}])
def test_setup_type_errors_are_400(client, body):
    response = client.post("/setup", json=body, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]


@pytest.mark.parametrize("body", [{"tasks": 5, "label_config": CONFIG}, {"tasks": "x", "label_config": CONFIG},
                                  {"tasks": [], "label_config": 5}, {"tasks": []}, [], None, "x",
                                  {"tasks": [], "label_config": ["<View/>"]}, {"tasks": [], "schema": {"a": 1}},
                                  {"tasks": [], "label_config": "<View"}])
def test_predict_type_errors_are_400(client, body):
    response = client.post("/predict", json=body, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]


# ---- 5. webhook payloads: validated before any write -----------------------------------------------------


BAD_EVENTS = {
    "no annotation id": annotation_event(id=None),
    "string annotation id": annotation_event(id="11"),
    "float annotation id": annotation_event(id=11.5),
    "negative annotation id": annotation_event(id=-3),
    "huge annotation id": annotation_event(id=2**70),
    "integer project": {**annotation_event(), "project": 1},
    "project without id": {**annotation_event(), "project": {"title": "x"}},
    "no project": {k: v for k, v in annotation_event().items() if k != "project"},
    "result is a number": annotation_event(result=5),
    "result item is a string": annotation_event(result=["x"]),
    "prediction is a list": annotation_event(prediction=[1]),
    "start is not a number": annotation_event(result=[{"type": "textarea", "value": {"start": "abc", "text": ["x"]}}]),
    "start is infinite": annotation_event(result=[{"type": "labels", "value": {"start": 1e400}}]),
    "text is a number": annotation_event(result=[{"type": "textarea", "value": {"text": [5]}}]),
    "updated_at is not a date": annotation_event(updated_at="yesterday"),
    "no action": {"project": {"id": 1}},
    "action is a number": {"action": 5, "project": {"id": 1}},
    "delete without a list": {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": {"id": 1}},
    "delete with string ids": {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": "1"}]},
    "training without project": {"action": "START_TRAINING"},
    "not an object": [annotation_event()],
    "far-future updated_at": annotation_event(updated_at=(datetime.now(UTC) + timedelta(days=400)).isoformat()),
}


@pytest.mark.parametrize("name", list(BAD_EVENTS))
def test_malformed_webhook_is_400_before_any_write(client, tmp_path, name):
    """Defect: these gave 500, some after a ledger write (which then crashed `loopscribe status`)."""
    response = client.post("/webhook", json=BAD_EVENTS[name], headers=HOOK)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]
    assert not (tmp_path / "webhooks" / "events.jsonl").exists()
    ledger = Ledger(tmp_path / "ledger.db")
    assert ledger.corrections.snapshot() == [] and ledger.jobs.list() == [] and ledger.projects() == []


def test_valid_webhook_still_recorded_and_status_reads_it(client, tmp_path):
    response = client.post("/webhook", json=annotation_event(), headers=HOOK)
    assert response.status_code == 201 and response.get_json()["changed"] == 1
    assert client.post("/webhook", json=annotation_event(), headers=HOOK).get_json()["changed"] == 0  # replay
    ledger = Ledger(tmp_path / "ledger.db")
    assert [r["id"] for r in ledger.corrections.snapshot(1)] == [11]
    assert ledger.corrections.counts(1) == {"correction": 1}


def test_timestamps_within_the_skew_are_accepted(client):
    soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert client.post("/webhook", json=annotation_event(updated_at=soon), headers=HOOK).status_code == 201


def test_events_for_projects_label_studio_lacks_are_ignored(client, tmp_path, standin):
    """Defect: such events were recorded and could queue training. Fix: ask Label Studio (cached)."""
    for event in (annotation_event() | {"project": {"id": 999}}, {"action": "START_TRAINING", "project": {"id": 998}}):
        response = client.post("/webhook", json=event, headers=HOOK)
        assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    ledger = Ledger(tmp_path / "ledger.db")
    assert ledger.projects() == [] and ledger.jobs.list() == []
    assert not (tmp_path / "webhooks" / "events.jsonl").exists()
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}}, headers=HOOK)
    assert response.status_code == 201 and response.get_json()["job"]["queued_now"]


def test_label_studio_down_loses_no_event(settings, tmp_path, standin):
    """When Label Studio cannot say whether the project exists, the event is recorded (not lost)."""
    down = replace(app_settings(settings, tmp_path, standin), label_studio_url="http://127.0.0.1:9")
    client = create_app(down, StandInEngine()).test_client()
    assert client.post("/webhook", json=annotation_event(), headers=HOOK).status_code == 201
    assert Ledger(tmp_path / "ledger.db").corrections.counts(1) == {"correction": 1}


# ---- 7. unbounded growth -------------------------------------------------------------------------------------


def test_unknown_webhook_actions_share_one_metrics_series(client):
    """Defect: every distinct `action` became a new /metrics series."""
    for i in range(30):
        assert client.post("/webhook", json={"action": f"MADE_UP_{i}"}, headers=HOOK).status_code == 201
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'loopscribe_webhook_events_total{action="other"} 30.0' in metrics
    assert "MADE_UP" not in metrics


def test_request_body_and_task_count_are_bounded(settings, tmp_path, standin):
    s = app_settings(settings, tmp_path, standin, max_request_bytes=50_000, max_tasks_per_request=3)
    client = create_app(s, StandInEngine()).test_client()
    big = client.post("/webhook", data=b"{" + b" " * 60_000 + b"}", headers=HOOK | {"Content-Type": "application/json"})
    assert big.status_code == 413 and "MAX_REQUEST_BYTES" in big.get_json()["error"]
    many = client.post("/predict", json={"tasks": [{"data": {}}] * 4, "label_config": CONFIG}, headers=AUTH)
    assert many.status_code == 413 and "MAX_TASKS_PER_REQUEST" in many.get_json()["error"]


def test_busy_backend_answers_503_with_retry_after(settings, tmp_path, standin):
    """At most MAX_CONCURRENT_PREDICTS requests wait on the model; the rest are told to come back."""
    s = app_settings(settings, tmp_path, standin, max_concurrent_predicts=1)
    app = create_app(s, StandInEngine())
    slow = {"tasks": [{"id": 1, "data": {"audio": "/data/upload/1/slow.wav"}}], "label_config": CONFIG}
    StandIn.hold.clear()
    StandIn.seen.clear()
    with ThreadPoolExecutor(1) as pool:
        # the first request holds the only slot while its download hangs (it is not audio: an empty result)
        first = pool.submit(lambda: app.test_client().post("/predict", json=slow, headers=AUTH))
        for _ in range(200):
            if "/data/upload/1/slow.wav" in StandIn.seen:
                break
            time.sleep(0.05)
        second = app.test_client().post("/predict", json=slow, headers=AUTH)
        StandIn.hold.set()
        assert first.result(timeout=30).status_code == 200
    assert second.status_code == 503 and second.headers["Retry-After"].isdigit()
    assert "MAX_CONCURRENT_PREDICTS" in second.get_json()["error"]


def test_ffmpeg_has_a_timeout(shared_audio):
    with pytest.raises(AudioDecodeError, match="FFMPEG_TIMEOUT"):
        decode_audio(shared_audio / "mit_license_en_de.mp3", timeout=0.001)


def test_client_values_are_logged_on_one_bounded_line(client, caplog):
    """Defect: raw task ids and references in logs (a newline forged a line; a 1 MB id made a 2 MB line)."""
    forged = "x\nERROR forged line " + "y" * 1_000_000
    tasks = [{"id": 1, "data": {"audio": forged}}, {"id": forged, "data": {"audio": "/api/x"}}]
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}, headers=AUTH)
    assert response.status_code == 200
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all("\n" not in line and len(line) < 1000 for line in lines), [len(line) for line in lines]


# ---- 3. the backend's token goes to Label Studio's media routes only ------------------------------------------


@pytest.mark.parametrize("reference, task_id", [
    ("/api/projects/3/", 1),
    ("/api/current-user/token", 1),
    ("{ls}/api/projects/3/", 1),
    ("/data/upload/../../api/projects/3/", 1),
    ("/data/upload/%2e%2e/%2e%2e/api/projects/3/", 1),
    ("/data/upload/1/./../../api/projects/", 1),
    ("//127.0.0.1:1/data/upload/1/comfy.wav", 1),
    ("/data/local-files/", 1),
    ("/tasks/8/presign/?fileuri=czM6Ly9iL2Eud2F2", 1),  # another task's presign route
    ("/data/upload/1/to-api", 1),  # a media path that redirects to the API
    ("s3://b/a.wav", 7),  # presigned redirect to a host not in ALLOWED_AUDIO_HOSTS
    ("http://unlisted.invalid/a.wav", 1),
    ("file:///etc/passwd", 1),
])
def test_only_media_routes_and_allowed_hosts_are_fetched(settings, tmp_path, standin, reference, task_id):
    """Defect: any Label Studio URL (e.g. /api/projects/3/) was requested with the backend's admin token."""
    fetcher = AudioFetcher(app_settings(settings, tmp_path, standin))
    StandIn.seen.clear()
    with pytest.raises(AudioFetchError):
        fetcher.fetch(reference.format(ls=standin[0]), task_id)
    assert not any(p.startswith("/api/") for p in StandIn.seen), StandIn.seen


@pytest.mark.parametrize("reference, task_id", [
    ("/data/upload/1/comfy.wav", 1),
    ("{ls}/data/upload/1/comfy.wav", 1),
    ("/data/upload/1/to-other", 1),  # redirect to an allowed host, no token sent there (it answers 500 if so)
    ("{other}/x.wav", 1),
    ("s3://b/a.wav", 8),  # presigned: the redirect target is an allowed host
])
def test_media_routes_and_allowed_hosts_still_work(settings, tmp_path, standin, reference, task_id):
    fetcher = AudioFetcher(app_settings(settings, tmp_path, standin))
    data = fetcher.fetch(reference.format(ls=standin[0], other=standin[1]), task_id)
    assert data == StandIn.files["/data/upload/1/comfy.wav"]


# ---- 8. defects seen in the code -----------------------------------------------------------------------------


def test_training_follows_whisper_device_and_dtype(settings):
    """Defect: training ignored WHISPER_DEVICE / WHISPER_DTYPE."""
    from training.lora import LoraArguments, device_and_precision

    args = LoraArguments.from_settings(replace(settings, device="cpu", dtype="bfloat16"))
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
    assert device_and_precision("cpu", "bfloat16") == ("cpu", "bf16")
    assert device_and_precision("cpu", "float32") == ("cpu", "no")
    assert device_and_precision("cpu", "float16") == ("cpu", "no")  # fp16 autocast needs a GPU
    assert device_and_precision("cpu", "auto") == ("cpu", "no")


def test_quantized_live_version_is_listed_once(settings, tmp_path, standin):
    """Defect: with WHISPER_QUANTIZE=1, /versions listed the live model twice and `status` disagreed with
    the project's model_version (the registry name without -int8)."""
    from ml_backend.live import live_model
    from ml_backend.model_store import resolve_base
    from ml_backend.registry import ModelVersion, Registry

    home = tmp_path / "home"
    (home / "models").parent.mkdir(parents=True)
    (home / "models").symlink_to(settings.models_dir)
    s = replace(app_settings(settings, home, standin), quantize=True, device="cpu")
    base = resolve_base(s)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    registry = Registry(home)
    for n in (1, 2):
        version = f"{base.version}-lora00{n}-test"
        registry.add(ModelVersion(version=version, base_version=base.version, base_model=base.path,
                                  parent=base.version, project=1, created_at=f"2026-01-0{n}T00:00:00Z"), adapter)
        registry.promote(version, base.version)
    client = create_app(s).test_client()  # not pinned: the live model is worked out as in production
    versions = client.get("/versions?project=1", headers=AUTH).get_json()["versions"]
    live = client.post("/setup", json={"project": "1.1764000000"}, headers=AUTH).get_json()["model_version"]
    assert live == f"{base.version}-lora002-test-int8" == live_model(s, 1).version == versions[0]
    assert versions == [live, f"{base.version}-lora001-test-int8"]


def test_gate_skips_training_and_evaluation_when_heldout_is_too_small(settings, tmp_path, monkeypatch):
    """Defect: the gate evaluated both models even when the held-out split was too small to decide."""
    from training import pipeline
    from training.dataset import Example

    examples = [Example(task=i, audio=np.zeros(16000, np.float32), text="x", language="en") for i in range(6)]
    monkeypatch.setattr(pipeline, "export_annotated", lambda ls, project: (None, [type("T", (), {"task": i})()
                                                                                  for i in range(6)]))
    monkeypatch.setattr(pipeline, "frozen_splits", lambda *a: {i: "heldout" if i == 0 else "train" for i in range(6)})
    monkeypatch.setattr(pipeline, "load_examples", lambda *a: (examples, {}))

    def must_not_run(*a, **k):
        raise AssertionError("trained or evaluated although the held-out split cannot decide")

    monkeypatch.setattr(pipeline.distributed, "train", must_not_run)
    monkeypatch.setattr(pipeline, "evaluate", must_not_run)
    outcome = pipeline.run_training(replace(settings, home=tmp_path, heldout_min_items=4), None, None, 1, None)
    assert outcome.state == "rejected" and outcome.version is None
    assert "not enough evidence" in outcome.reason and "1 items" in outcome.reason


def test_compose_proxy_template_is_valid_nginx(tmp_path):
    """The compose proxy's server block, with its variables filled in as the nginx image does, passes `nginx -t`."""
    from loopscribe.proxy import compose_template, nginx_binary

    server = compose_template().replace("${CLIENT_TIMEOUT}", "10").replace("${MAX_REQUEST_BYTES}", "10485760")
    server = server.replace("ml-backend:9091", "127.0.0.1:9091")
    conf = tmp_path / "nginx.conf"
    temp = "\n".join(f"{k}_temp_path {tmp_path}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n{temp}\n{server}\n}}\n")
    check = subprocess.run([nginx_binary(), "-t", "-c", str(conf), "-e", "stderr"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# ---- 2. one malformed task never fails the batch (real model) ---------------------------------------------------


@pytest.mark.slow
def test_malformed_tasks_get_empty_results_and_the_rest_is_predicted(settings, engine, tmp_path, standin):
    """Defect: a task that is `1`, `null`, or has `data` as a string or list failed the whole batch (500)."""
    s = app_settings(settings, tmp_path, standin, batch_size=2)
    client = create_app(s, engine).test_client()
    calls: list[int] = []
    transcribe = engine.transcribe
    client.application.config["service"].live._pinned = type("Spy", (), {
        "model_version": engine.model_version,
        "transcribe": lambda self, clips, *a, **k: calls.append(len(clips)) or transcribe(clips, *a, **k)})()
    good = {"id": 9, "data": {"audio": "/data/upload/1/comfy.wav"}}
    tasks = [1, None, {"id": 2, "data": "x"}, {"id": 3, "data": [1]}, good, "task", {"id": "7"}, good, good]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}, headers=AUTH)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    assert [bool(r["result"]) for r in results] == [False] * 4 + [True, False, False, True, True]
    assert max(calls) <= 2, "decoded audio is held one chunk (WHISPER_BATCH_SIZE) at a time, not the whole batch"


# ---- 1. the served backend: slow clients and load (gunicorn behind nginx, as `up` starts it) ---------------------


@pytest.fixture(scope="module")
def served(settings, standin, tmp_path_factory):
    """The backend as `up` runs it, on loopback, with short client timeouts and few slots for quick probes."""
    from conftest import free_port

    from loopscribe import stack

    home = tmp_path_factory.mktemp("served")
    (home / "models").symlink_to(settings.models_dir)
    url = f"http://127.0.0.1:{free_port()}"
    values = {"LABEL_STUDIO_URL": standin[0], "LABEL_STUDIO_API_KEY": TOKEN, "BACKEND_URL": url,
              "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw", "WEBHOOK_SECRET": SECRET}
    env = {"CLIENT_TIMEOUT": "2", "MAX_CONCURRENT_PREDICTS": "4", "BACKEND_THREADS": "8"}
    s = replace(settings, home=home, backend_url=url, client_timeout=2, max_concurrent_predicts=4, backend_threads=8)
    paths = stack.StackPaths(home)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            stack.start_backend(values, s, paths)
            # the first /predict waits for the model load; do it before any probe
            warm = requests.post(f"{url}/predict", auth=("ls", "pw"), timeout=120, json={
                "tasks": [{"id": 1, "data": {"audio": "/data/upload/1/comfy.wav"}}], "label_config": CONFIG})
            assert warm.status_code == 200 and warm.json()["results"][0]["result"]
            yield url, paths
        finally:
            stack.stop(paths)


def slow_client(url: str, partial: bytes) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(partial)
    return sock


@pytest.mark.slow
def test_slow_clients_do_not_freeze_the_served_backend(served):
    """Defect: four connections that never finished their headers made /health and /predict hang for everyone.
    Fix: nginx in front reads whole requests (header/body timeouts) before gunicorn sees them."""
    url, _ = served
    stalled = [slow_client(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(20)]
    stalled += [slow_client(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"ta")
                for _ in range(20)]
    try:
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "UP"
        response = requests.post(f"{url}/predict", auth=("ls", "pw"), timeout=60, json={
            "tasks": [{"id": 1, "data": {"audio": "/data/upload/1/comfy.wav"}}], "label_config": CONFIG})
        assert response.status_code == 200 and response.json()["results"][0]["result"]
        # the proxy drops them after CLIENT_TIMEOUT (2 s here): reset, closed or 408, never left hanging
        for sock in stalled[:3] + stalled[-3:]:
            sock.settimeout(15)
            try:
                answer = sock.recv(200)
            except ConnectionResetError:  # nginx's reset_timedout_connection
                answer = b""
            assert answer == b"" or b" 408 " in answer.split(b"\r\n")[0], answer
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.slow
def test_health_answers_while_every_model_slot_is_busy(served):
    """Defect: /health took 27 s under 20 parallel /predict. Fix: at most MAX_CONCURRENT_PREDICTS requests
    hold threads waiting on the model (others get 503 + Retry-After), so threads stay free for /health."""
    url, _ = served
    done: list[int] = []

    def predict(i: int) -> requests.Response:
        r = requests.post(f"{url}/predict", auth=("ls", "pw"), timeout=300, json={
            "tasks": [{"id": i, "data": {"audio": f"/data/upload/1/load-{i}.wav"}}], "label_config": CONFIG})
        done.append(i)
        return r

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(predict, i) for i in range(20)]
        while not any("load-" in p for p in StandIn.seen):  # wait until the model is busy
            time.sleep(0.05)
        health = requests.get(f"{url}/health", timeout=30)
        finished_before_health = len(done)
        responses = [f.result(timeout=300) for f in futures]
    assert health.json()["status"] == "UP"
    assert finished_before_health < 20, "/health waited for the whole predict queue"
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 200 in codes, codes
    assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 503)
    assert all(r.json()["results"][0]["result"] for r in responses if r.status_code == 200)


@pytest.mark.slow
def test_served_backend_refuses_bad_input_without_500(served):
    """The probe table, against the real server: none of these is a 500, all are answered."""
    url, paths = served
    probes = [
        ("POST", "/setup", {"json": {"schema": [1]}, "auth": ("ls", "pw")}, 400),
        ("POST", "/setup", {"json": {}, "auth": ("ü", "ö")}, 401),
        ("POST", "/predict", {"json": {"tasks": 1, "label_config": CONFIG}, "auth": ("ls", "pw")}, 400),
        ("POST", "/predict", {"data": b"x" * (11 * 1024 * 1024), "auth": ("ls", "pw")}, 413),
        ("POST", "/webhook", {"json": annotation_event(result=5), "headers": HOOK}, 400),
        ("POST", "/webhook", {"json": annotation_event(), "headers": {WEBHOOK_SECRET_HEADER: "é"}}, 401),
        ("GET", "/nope", {}, 401),
        ("GET", "/nope", {"auth": ("ls", "pw")}, 404),
    ]
    for method, path, kwargs, expected in probes:
        response = requests.request(method, f"{url}{path}", timeout=30, **kwargs)
        assert response.status_code == expected, (path, response.status_code, response.text[:200])
        assert response.headers["Content-Type"].startswith("application/json"), path
    log = paths.log_file("ml-backend").read_text(errors="replace")
    assert "Traceback" not in log

