"""The job queue (huey): SQLite-backed by default, Redis when ``REDIS_URL`` is set.

The worker is a separate process: ``huey_consumer loopscribe.jobs.huey`` (``up`` starts
it). Jobs are registered under explicit names, so any process that opens the same
queue (the CLI, a test, another machine with the same Redis) can enqueue them.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict

from huey import Huey, RedisHuey, SqliteHuey

from ml_backend.settings import Settings

log = logging.getLogger(__name__)
_engine_lock = threading.Lock()
_engine = None


def open_queue(settings: Settings) -> Huey:
    redis_url = os.environ.get("REDIS_URL")
    if redis_url:
        return RedisHuey("loopscribe", url=redis_url)
    settings.home.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("loopscribe", filename=str(settings.home / "queue.db"))


def _worker_engine(settings: Settings):
    """One engine per worker process, loaded on the first job."""
    global _engine
    with _engine_lock:
        if _engine is None:
            from ml_backend.engine import WhisperEngine

            _engine = WhisperEngine(settings)
        return _engine


def run_prediction(project: int, only_missing: bool = True) -> dict:
    """Bulk pre-annotation of one project with the live model (resumable: only_missing skips done tasks)."""
    from . import labelstudio

    settings = Settings.from_env()
    report = labelstudio.predict_project(labelstudio.client(settings), settings, project, _worker_engine(settings),
                                         only_missing=only_missing, progress=False)
    log.info("project %s: %s", project, report)
    return asdict(report)


def register(queue: Huey) -> dict:
    """The jobs, by name. A job that dies with its worker is retried once."""
    return {"predict": queue.task(retries=1, retry_delay=5, name="predict")(run_prediction)}


def enqueue_prediction(settings: Settings, project: int, only_missing: bool = True):
    """Queue bulk pre-annotation; returns huey's result handle (``.get(blocking=True)``)."""
    return register(open_queue(settings))["predict"](project, only_missing)


def queue_status(settings: Settings) -> dict:
    queue = open_queue(settings)
    return {"backend": "redis" if os.environ.get("REDIS_URL") else "sqlite", "pending": queue.pending_count(),
            "scheduled": queue.scheduled_count()}


# The consumer imports this module; its environment is set by `up` (see stack.start_worker).
huey = open_queue(Settings.from_env())
jobs = register(huey)
