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
from typing import Callable

from flask import Flask, Response, jsonify, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .audio import AudioDecodeError, duration
from .fetch import AudioFetcher, AudioFetchError, load_task_audio
from .label_config import LabelConfigError, parse_label_config
from .ledger import Ledger
from .live import LiveEngine
from .predictions import to_prediction
from .settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-Loopscribe-Secret"
OPEN_ROUTES = {"/health"}  # liveness probes need no credentials
FETCH_THREADS = 4


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

    def __init__(self, settings: Settings, engine=None):
        self.settings = settings
        self.fetcher = AudioFetcher(settings)
        self.live = LiveEngine(settings, engine)

    @property
    def engine(self):
        return self.live.get()

    @property
    def model_version(self) -> str:
        """The live version, answered without loading the model: Label Studio gives /setup 3 seconds."""
        return self.live.version

    def warm_up(self) -> threading.Thread:
        """Load the model in the background so the first /predict does not pay for it; then keep
        watching the registry so a promoted version is loaded before it is asked for."""
        from .text import normalize

        def load() -> None:
            normalize("warm up")  # the ledger's normalizer, imported before the first webhook
            self.live.get()
            self.live.watch()

        thread = threading.Thread(target=load, name="engine-warm-up", daemon=True)
        thread.start()
        return thread

    def predict(self, tasks: list[dict], label_config: str, metrics: Metrics | None = None) -> list[dict]:
        config = parse_label_config(label_config)
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            loaded = list(pool.map(lambda t: self._try_load(t, config.audio_key), tasks))
        good = [i for i, clip in enumerate(loaded) if clip is not None]
        transcripts = self.engine.transcribe([loaded[i] for i in good]) if good else []
        version = self.model_version
        results: list[dict] = [{"result": [], "score": 0.0, "model_version": version} for _ in tasks]
        for i, t in zip(good, transcripts):
            results[i] = to_prediction(t, config)
        if metrics:
            metrics.tasks.labels("ok").inc(len(good))
            metrics.tasks.labels("error").inc(len(tasks) - len(good))
            metrics.audio_seconds.inc(sum(duration(loaded[i]) for i in good))
        return results

    def _try_load(self, task: dict, key: str):
        try:
            return load_task_audio(self.fetcher, task.get("id"), task.get("data") or {}, key)
        except (AudioFetchError, AudioDecodeError) as exc:
            log.warning("task %s: no prediction: %s", task.get("id"), exc)
            return None


def create_app(settings: Settings | None = None, engine=None, *, warm_up: bool = False,
               enqueue_job: Callable[[int], None] | None = None) -> Flask:
    """``enqueue_job(job_id)`` hands a queued training job to the worker; without it, jobs wait in
    the ledger until a worker starts (the worker re-enqueues queued jobs on start-up)."""
    settings = settings or Settings.from_env()
    service = PredictionService(settings, engine)
    if warm_up:
        service.warm_up()
    metrics = Metrics()
    ledger = Ledger(settings.ledger_path)
    events_file = settings.home / "webhooks" / "events.jsonl"
    app = Flask(__name__)
    app.config["service"] = service
    app.config["metrics"] = metrics

    @app.before_request
    def authenticate():
        request.environ["loopscribe.start"] = time.perf_counter()
        if request.path in OPEN_ROUTES or request.path == "/webhook":
            return None
        if settings.basic_auth_user and settings.basic_auth_pass:
            auth = request.authorization
            ok = auth is not None and hmac.compare_digest(auth.username or "", settings.basic_auth_user) \
                and hmac.compare_digest(auth.password or "", settings.basic_auth_pass)
            if not ok:
                return Response("authentication required\n", 401, {"WWW-Authenticate": 'Basic realm="loopscribe"'})
        return None

    @app.after_request
    def record(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        start = request.environ.get("loopscribe.start")
        if start is not None:
            metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class="WhisperEngine", model_dir=settings.whisper_model)

    @app.post("/setup")
    def setup():
        body = request.get_json(silent=True) or {}
        schema = body.get("schema")
        if schema:
            try:
                parse_label_config(schema)
            except LabelConfigError as exc:
                return jsonify(error=str(exc)), 400
        version = service.model_version
        metrics.model.clear()
        metrics.model.labels(version).set(1)
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            return jsonify(error='expected JSON {"tasks": [...], "label_config": "<View>…"}'), 400
        label_config = body.get("label_config") or body.get("schema")
        if not label_config:
            return jsonify(error="request has no label_config"), 400
        try:
            results = service.predict(body["tasks"], label_config, metrics)
        except LabelConfigError as exc:
            return jsonify(error=str(exc)), 400
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        if settings.webhook_secret:
            given = request.headers.get(WEBHOOK_SECRET_HEADER, "")
            if not hmac.compare_digest(given, settings.webhook_secret):
                return jsonify(error=f"missing or wrong {WEBHOOK_SECRET_HEADER} header"), 401
        event = request.get_json(silent=True)
        if not isinstance(event, dict) or "action" not in event:
            return jsonify(error="expected a Label Studio webhook event with an 'action'"), 400
        action = str(event["action"])
        metrics.webhooks.labels(action).inc()
        events_file.parent.mkdir(parents=True, exist_ok=True)  # raw audit log, replayable into a ledger
        with open(events_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"received_at": time.time(), "event": event}, ensure_ascii=False) + "\n")
        recorded = ledger.record(event)
        job, created = None, False
        if recorded.project is not None and action == "START_TRAINING":
            job, created = ledger.request_training(int(recorded.project), "label-studio")
        elif recorded.project is not None and recorded.changed and settings.retrain_min_corrections > 0:
            job, created = ledger.request_training(int(recorded.project), "threshold",
                                                   min_corrections=settings.retrain_min_corrections)
        if created and enqueue_job is not None:
            enqueue_job(job.id)
        answer = {"status": "ok", "changed": recorded.changed}
        if job is not None:
            answer["job"] = {"id": job.id, "state": job.state, "queued_now": created}
        return jsonify(answer), 201

    @app.get("/versions")
    def versions():
        from .registry import Registry

        fine_tuned = [v.version for v in Registry(settings.home).list() if v.status in ("live", "retired")]
        live = service.model_version
        return jsonify(versions=[live] + [v for v in reversed(fine_tuned) if v != live])

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    return app
