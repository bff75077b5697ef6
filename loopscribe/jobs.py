"""The job queue (huey): SQLite-backed by default, Redis when ``REDIS_URL`` is set.

The worker is a separate process: ``huey_consumer loopscribe.jobs.huey`` (``up`` starts
it). Jobs are registered under explicit names, so any process that opens the same
queue (the backend, the CLI, a test, another machine with the same Redis) can enqueue them.

Training jobs live in the corrections ledger as well as in the queue: the ledger row is
the truth (state, attempts, progress, outcome); the queue message only says "run job N".
Huey drops a message once a worker takes it, so a worker that dies mid-training would
lose the job; instead, every worker start (and a check every minute) looks for running
jobs whose worker is gone and queues them again until ``TRAIN_MAX_ATTEMPTS``, after
which they are failed with the reason. A duplicate message is harmless: only the first
``claim`` of a queued job runs it.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from dataclasses import asdict

from huey import Huey, RedisHuey, SqliteHuey, crontab

from ml_backend.errors import LoopscribeError
from ml_backend.ledger import Ledger
from ml_backend.live import LiveEngine
from ml_backend.settings import Settings
from ml_backend.training_jobs import Job

from .labelstudio import describe_error
from .stack import process_alive

log = logging.getLogger(__name__)
_live_lock = threading.Lock()
_live: LiveEngine | None = None
STALE_HEARTBEAT_S = 900  # a running job silent this long (any host) is considered dead


def open_queue(settings: Settings) -> Huey:
    if settings.redis_url:
        return RedisHuey("loopscribe", url=settings.redis_url)
    settings.home.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("loopscribe", filename=str(settings.home / "queue.db"))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _worker_engine(settings: Settings, project: int):
    """``project``'s live model from the worker's one pool (loaded on first use, hot-swapped after promotions)."""
    global _live
    with _live_lock:
        if _live is None:
            _live = LiveEngine(settings)
    return _live.get(project)


def run_prediction(project: int, only_missing: bool = True, only_unlabeled: bool = False) -> dict:
    """Bulk pre-annotation of one project with the live model (resumable: only_missing skips done tasks)."""
    from . import labelstudio

    settings = Settings.from_env()
    report = labelstudio.predict_project(labelstudio.client(settings), settings, project,
                                         _worker_engine(settings, project),
                                         only_missing=only_missing, only_unlabeled=only_unlabeled, progress=False)
    log.info("project %s: %s", project, report)
    return asdict(report)


def run_training_job(job_id: int) -> dict:
    """Claim a queued training job, run one round, and re-score the project if it was promoted."""
    from training.pipeline import run_training

    from . import labelstudio

    settings = Settings.from_env()
    ledger = Ledger(settings.ledger_url)
    job = ledger.jobs.claim(job_id, worker_id())
    if job is None:
        log.info("training job %s is not queued any more (duplicate message); skipped", job_id)
        return {"job": job_id, "skipped": True}
    log.info("training job %s for project %s (attempt %d, trigger %s)", job.id, job.project, job.attempts, job.trigger)
    try:
        ls = labelstudio.client(settings)
        outcome = run_training(settings, ls, ledger, job.project, _worker_engine(settings, job.project),
                               params=job.params,
                               on_progress=lambda **f: ledger.jobs.progress(job.id, **f))
        reason = outcome.summary()
        if outcome.state == "promoted":
            ledger.jobs.progress(job.id, stage="re-scoring", version=outcome.version)
            try:
                report = labelstudio.predict_project(ls, settings, job.project, _worker_engine(settings, job.project),
                                                     only_missing=True, only_unlabeled=True, progress=False)
                reason += f"; re-scored {report.predicted} unlabeled tasks"
            except Exception as exc:  # the promotion stands; re-scoring can be re-run with `predict`
                log.exception("re-scoring project %s failed", job.project)
                reason += (f"; re-scoring failed: {describe_error(exc)} "
                           f"(run `loopscribe predict --project {job.project}`)")
        ledger.jobs.finish(job.id, outcome.state, version=outcome.version, reason=reason)
        log.info("training job %s: %s", job.id, reason)
        queue_follow_up(settings, ledger, job.project)
        return {"job": job.id, "state": outcome.state, "version": outcome.version, "reason": reason}
    except Exception as exc:
        log.exception("training job %s failed", job.id)
        ledger.jobs.finish(job.id, "failed", reason=describe_error(exc))
        return {"job": job.id, "state": "failed", "reason": str(exc)}


def queue_follow_up(settings: Settings, ledger: Ledger, project: int) -> int | None:
    """After a job ends: corrections that arrived while it ran may already reach the threshold. Their
    webhooks found a job running (coalesced) and queued nothing, so queue the next job now. Not after a
    failure: its corrections count again, and the next correction (or an admin) starts the retry."""
    if settings.retrain_min_corrections <= 0:
        return None
    job, created = ledger.jobs.request(project, "threshold", min_corrections=settings.retrain_min_corrections)
    if job is None or not created:
        return None
    log.info("project %s: %d corrections waiting: training job %s queued", project,
             ledger.jobs.corrections_since_training(project), job.id)
    enqueue_training_job(job.id)
    return job.id


def recover_jobs(settings: Settings, enqueue=None, *, on_start: bool = False) -> list[tuple[int, str]]:
    """Requeue or fail running jobs whose worker is gone; on worker start also re-send queued jobs.

    A worker counts as gone when it ran on this host and its pid is dead, or when its last
    heartbeat is older than :data:`STALE_HEARTBEAT_S` (other hosts).
    """
    ledger = Ledger(settings.ledger_url)
    enqueue = enqueue or enqueue_training_job
    host = socket.gethostname()
    changed = []
    for job in ledger.jobs.list(states=("running",), limit=1000):
        worker_host, _, pid = (job.worker or "").rpartition(":")
        dead_here = worker_host == host and pid.isdigit() and not process_alive(int(pid))
        silent = job.heartbeat_at is not None and time.time() - job.heartbeat_at > STALE_HEARTBEAT_S
        if dead_here or silent:
            where = f"step {job.step}/{job.total_steps}" if job.total_steps else f"stage {job.stage}"
            reason = (f"worker {job.worker} stopped during {where} "
                      f"(attempt {job.attempts} of {settings.train_max_attempts})")
            state = ledger.jobs.requeue_or_fail(job.id, reason, settings.train_max_attempts)
            log.warning("training job %s: %s → %s", job.id, reason, state)
            changed.append((job.id, state))
            if state == "queued":
                enqueue(job.id)
    if on_start:
        for job in ledger.jobs.list(states=("queued",), limit=1000):
            if (job.id, "queued") not in changed:
                enqueue(job.id)
    return changed


def register(queue: Huey) -> dict:
    """The jobs, by name."""
    return {
        "predict": queue.task(retries=1, retry_delay=5, name="predict")(run_prediction),
        "train": queue.task(name="train")(run_training_job),
    }


def enqueue_prediction(settings: Settings, project: int, only_missing: bool = True):
    """Queue bulk pre-annotation; returns huey's result handle (``.get(blocking=True)``)."""
    return register(open_queue(settings))["predict"](project, only_missing)


def enqueue_training_job(job_id: int) -> None:
    """Hand a ledger training job (already in state ``queued``) to the workers."""
    register(open_queue(Settings.from_env()))["train"](job_id)


def request_training(settings: Settings, project: int, trigger: str = "cli",
                     params: dict | None = None) -> tuple[Job, bool]:
    """Queue a training job for ``project`` now (coalesced with a queued or running one)."""
    job, created = Ledger(settings.ledger_url).jobs.request(project, trigger, params)
    if job is None:  # only a threshold can decline, and none was given
        raise LoopscribeError(f"no training job for project {project}")
    if created:
        enqueue_training_job(job.id)
    return job, created


def queue_status(settings: Settings) -> dict:
    queue = open_queue(settings)
    return {"backend": "redis" if settings.redis_url else "sqlite", "pending": queue.pending_count(),
            "scheduled": queue.scheduled_count()}


def _recover_on_start() -> None:
    try:
        recover_jobs(Settings.from_env(), on_start=True)
    except Exception:
        log.exception("job recovery at start-up failed")


def _recover_periodically() -> None:
    recover_jobs(Settings.from_env())


@functools.cache
def consumer_queue() -> Huey:
    """The worker's queue with its jobs and recovery hooks, opened on first use (not at import)."""
    queue = open_queue(Settings.from_env())
    register(queue)
    queue.on_startup()(_recover_on_start)
    queue.periodic_task(crontab(minute="*"), name="recover-jobs")(_recover_periodically)
    return queue


def __getattr__(name: str) -> Huey:
    """``huey_consumer loopscribe.jobs.huey`` reads this attribute; its environment is set by `up`."""
    if name == "huey":
        return consumer_queue()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
