"""The ML backend's HTTP protocol, auth, audio fetching and per-task error isolation.

Label Studio's media server is stood in for by a real loopback HTTP server that enforces
the same auth (legacy ``Token`` or a PAT refreshed into a ``Bearer``); the engine is real.
The same protocol against a real Label Studio is in test_label_studio.py.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import QuietHandler

from ml_backend.app import WEBHOOK_SECRET_HEADER, create_app

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "label_config.xml"
LEGACY = "legacy-token-123"
PAT = "header.payload.signature"
ACCESS = "short-lived-access"


class MediaServer(QuietHandler):
    files: dict[str, bytes] = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/token/refresh/" and body.get("refresh") == PAT:
            self._send(200, json.dumps({"access": ACCESS}).encode())
        else:
            self._send(401, b"{}")

    def do_GET(self):
        if self.headers.get("Authorization") not in (f"Token {LEGACY}", f"Bearer {ACCESS}"):
            return self._send(401, b"auth required")
        if self.path == "/api/projects/1/":  # the backend asks whether a webhook's project exists
            return self._send(200, b"{}")
        if self.path.startswith("/redirect-out"):
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/x.wav")
            self.end_headers()
            return None
        data = self.files.get(self.path)
        return self._send(200, data) if data is not None else self._send(404, b"not found")


@pytest.fixture(scope="module")
def media(shared_audio):
    MediaServer.files = {
        "/data/upload/1/jfk.flac": (shared_audio / "jfk_en.flac").read_bytes(),
        "/data/local-files/?d=audio/dictee.aiff": (shared_audio / "dictee_fr.aiff").read_bytes(),
        "/data/upload/1/corrupt.mp3": b"\xff\xfb" + b"not audio" * 200,
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), MediaServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def make_client(settings, engine, media, tmp_path, **changes):
    s = replace(settings, label_studio_url=media, label_studio_api_key=LEGACY, home=tmp_path, **changes)
    return create_app(s, engine).test_client()


def tasks(media: str) -> list[dict]:
    return [
        {"id": 1, "data": {"audio": "/data/upload/1/jfk.flac"}},
        {"id": 2, "data": {"audio": "/data/upload/1/corrupt.mp3"}},
        {"id": 3, "data": {"audio": "/data/upload/1/missing.wav"}},
        {"id": 4, "data": {"audio": "/data/local-files/?d=audio/dictee.aiff"}},
        {"id": 5, "data": {"audio": "http://not-allowed.example/a.wav"}},
        {"id": 6, "data": {"audio": f"{media}/redirect-out"}},
        {"id": 7, "data": {"text": "no audio key"}},
    ]


def test_health_setup_versions(settings, engine, media, tmp_path):
    client = make_client(settings, engine, media, tmp_path)
    assert client.get("/health").get_json()["status"] == "UP"
    setup = client.post("/setup", json={"project": "1.123", "schema": CONFIG.read_text()})
    assert setup.status_code == 200 and setup.get_json()["model_version"] == engine.model_version
    assert client.get("/versions").get_json()["versions"] == [engine.model_version]


def test_predict_isolates_bad_tasks_and_keeps_order(settings, engine, media, tmp_path):
    client = make_client(settings, engine, media, tmp_path)
    body = {"tasks": tasks(media), "label_config": CONFIG.read_text(), "project": "1.1"}
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 7
    jfk, dictee = results[0], results[3]
    for r in (jfk, dictee):
        assert r["model_version"] == engine.model_version and 0 < r["score"] <= 1
        kinds = {item["type"]: item for item in r["result"]}
        assert kinds["textarea"]["from_name"] == "transcription" and kinds["textarea"]["to_name"] == "audio"
    assert "fellow Americans" in {i["type"]: i for i in jfk["result"]}["textarea"]["value"]["text"][0]
    assert {i["type"]: i for i in jfk["result"]}["choices"]["value"]["choices"] == ["en"]
    assert {i["type"]: i for i in dictee["result"]}["choices"]["value"]["choices"] == ["fr"]
    for bad in (1, 2, 4, 5, 6):  # corrupt, 404, host not allowed, redirect off-host, no audio key
        assert results[bad]["result"] == [], bad
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'loopscribe_predict_tasks_total{outcome="error"} 5.0' in metrics
    assert 'loopscribe_predict_tasks_total{outcome="ok"} 2.0' in metrics
    assert "loopscribe_request_seconds_bucket" in metrics and "loopscribe_audio_seconds_total" in metrics


def test_personal_access_token_is_refreshed_into_bearer(settings, engine, media, tmp_path):
    client = make_client(settings, engine, media, tmp_path)
    client.application.config["service"].fetcher.auth._key = PAT
    results = client.post("/predict", json={"tasks": tasks(media)[:1], "label_config": CONFIG.read_text()}).get_json()
    assert results["results"][0]["result"], "PAT → access token → media download"


def test_size_limit(settings, engine, media, tmp_path):
    client = make_client(settings, engine, media, tmp_path, max_audio_bytes=10_000)
    results = client.post("/predict", json={"tasks": tasks(media)[:1], "label_config": CONFIG.read_text()}).get_json()
    assert results["results"][0]["result"] == []


def test_wrong_label_config_is_a_clear_error(settings, engine, media, tmp_path):
    client = make_client(settings, engine, media, tmp_path)
    image_config = ('<View><Image name="img" value="$image"/>'
                    '<Choices name="c" toName="img"><Choice value="a"/></Choices></View>')
    for response in (client.post("/setup", json={"schema": image_config}),
                     client.post("/predict", json={"tasks": tasks(media)[:1], "label_config": image_config})):
        assert response.status_code == 400 and "Audio" in response.get_json()["error"]
    no_text = '<View><Audio name="a" value="$audio"/></View>'
    assert "TextArea" in client.post("/setup", json={"schema": no_text}).get_json()["error"]


def test_per_region_segment_config(settings, engine, media, tmp_path):
    config = """<View><Audio name="audio" value="$audio"/>
      <Labels name="seg" toName="audio"><Label value="Speech"/></Labels>
      <TextArea name="seg_text" toName="audio" perRegion="true"/>
      <Choices name="lang" toName="audio"><Choice value="en"/><Choice value="de"/></Choices></View>"""
    client = make_client(settings, engine, media, tmp_path)
    result = client.post("/predict", json={"tasks": tasks(media)[:1], "label_config": config}).get_json()["results"][0]
    labels = [i for i in result["result"] if i["type"] == "labels"]
    texts = [i for i in result["result"] if i["type"] == "textarea"]
    assert labels and len(labels) == len(texts)
    for label, text in zip(labels, texts):
        assert label["id"] == text["id"] and label["value"]["start"] == text["value"]["start"]
        assert label["value"]["labels"] == ["Speech"] and text["from_name"] == "seg_text"
    assert [i for i in result["result"] if i["type"] == "choices"][0]["value"]["choices"] == ["en"]


def test_basic_auth_enforced_when_set(settings, engine, media, tmp_path):
    client = make_client(settings, engine, media, tmp_path, basic_auth_user="ls", basic_auth_pass="pw")
    assert client.get("/health").status_code == 200  # liveness stays open
    assert client.post("/setup", json={}).status_code == 401
    assert client.post("/predict", json={"tasks": []}).status_code == 401
    assert client.get("/metrics").status_code == 401
    wrong = {"Authorization": "Basic " + __import__("base64").b64encode(b"ls:nope").decode()}
    right = {"Authorization": "Basic " + __import__("base64").b64encode(b"ls:pw").decode()}
    assert client.post("/setup", json={}, headers=wrong).status_code == 401
    assert client.post("/setup", json={}, headers=right).status_code == 200


def test_webhook_secret_enforced_when_set(settings, engine, media, tmp_path):
    client = make_client(settings, engine, media, tmp_path, webhook_secret="s3cret")
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": 1}}
    assert client.post("/webhook", json=event).status_code == 401
    assert client.post("/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: "wrong"}).status_code == 401
    assert client.post("/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: "s3cret"}).status_code == 201
    assert client.post("/webhook", data="junk", headers={WEBHOOK_SECRET_HEADER: "s3cret"}).status_code == 400
    recorded = (tmp_path / "webhooks" / "events.jsonl").read_text().splitlines()
    assert len(recorded) == 1 and json.loads(recorded[0])["event"] == event


class VersionedEngine:
    """The real engine under another version name, recording each batch: stands in for a project's adapter."""

    def __init__(self, engine, version: str, batches: list):
        self.engine, self.model_version, self.batches = engine, version, batches

    def transcribe(self, clips, options=None, **kwargs):
        self.batches.append((self.model_version, len(clips)))
        return [replace(t, model_version=self.model_version) for t in self.engine.transcribe(clips, options)]


def test_each_task_is_predicted_by_its_projects_model(settings, engine, media, tmp_path, monkeypatch):
    from ml_backend import live as live_module
    from ml_backend.model_store import ResolvedModel

    serving = {None: "base-v", 1: "project1-v", 2: "base-v"}
    monkeypatch.setattr(live_module, "live_model", lambda _s, project=None: live_module.LiveModel(
        ResolvedModel("m", "p", serving[project]), False))
    s = replace(settings, label_studio_url=media, label_studio_api_key=LEGACY, home=tmp_path)
    client = create_app(s).test_client()
    batches: list = []
    client.application.config["service"].live = live_module.LiveEngine(
        s, factory=lambda _s, model: VersionedEngine(engine, model.version, batches))
    jfk, dictee = {"audio": "/data/upload/1/jfk.flac"}, {"audio": "/data/local-files/?d=audio/dictee.aiff"}
    body = {"tasks": [{"id": 1, "project": 1, "data": jfk}, {"id": 4, "project": 2, "data": dictee},
                      {"id": 8, "data": jfk}, {"id": 9, "project": 1, "data": dictee}],
            "label_config": CONFIG.read_text(), "project": "2.1764000000"}
    results = client.post("/predict", json=body).get_json()["results"]
    assert [r["model_version"] for r in results] == ["project1-v", "base-v", "base-v", "project1-v"]
    assert all(r["result"] for r in results)
    assert sorted(batches) == [("base-v", 2), ("project1-v", 2)]  # one batch per project's model, never mixed
    for project, version in ((1, "project1-v"), (2, "base-v"), (None, "base-v")):
        setup = {"schema": CONFIG.read_text()} | ({"project": f"{project}.1764000000"} if project else {})
        assert client.post("/setup", json=setup).get_json()["model_version"] == version
    versions = client.get("/versions").get_json()
    assert versions["versions"][0] == "base-v" and versions["projects"]["global"] == "base-v"
