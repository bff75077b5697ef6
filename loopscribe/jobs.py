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

Bulk pre-annotation (``loopscribe predict --project N --queue``) works the same way, one
message per shard of a run (:mod:`ml_backend.prediction_runs`): any number of workers on any
machines sharing the database and Redis take shards, a dead worker's shard is requeued, and
asking again resumes the run.
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
from ml_backend.prediction_runs import SHARD_MAX_ATTEMPTS, SHARD_SIZE
from ml_backend.settings import Settings
from ml_backend.splits import ahead_cutoff
from ml_backend.training_jobs import Job

from .gpus import pin_worker_gpu
from .labelstudio import describe_error
from .stack import StackPaths, process_alive

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


def queue_prediction_run(settings: Settings, project: int, *, only_missing: bool = True,
                         only_unlabeled: bool = False, shard_size: int = SHARD_SIZE) -> tuple[int, bool, int]:
    """Split ``project`` into shards for the workers, or resume its unfinished run.

    Resuming requeues shards whose worker is gone and sends every queued shard again (a duplicate
    message is harmless: only one claim of a shard succeeds). Returns ``(run, created, shards sent)``.
    """
    from . import labelstudio

    ledger = Ledger(settings.ledger_url)
    run, created = ledger.prediction_runs.unfinished(project), False
    if run is None:  # only a new run needs the task list (start() still resumes one made meanwhile)
        task_ids = labelstudio.project_task_ids(labelstudio.client(settings), project)
        ahead = ahead_cutoff(project, len(task_ids), lambda: task_ids, settings.heldout_fraction,
                             settings.heldout_ahead, settings.heldout_ahead_tasks)
        run, created = ledger.prediction_runs.start(project, task_ids, shard_size, only_missing=only_missing,
                                                    only_unlabeled=only_unlabeled, ahead=ahead)
    if not created:
        recover_shards(settings, enqueue=lambda *_: None)
    queued = ledger.prediction_runs.list(("queued",), run=run)
    for shard in queued:
        enqueue_prediction_shard(settings, shard.run, shard.shard)
    return run, created, len(queued)


def run_prediction_shard(run: int, shard: int) -> dict:
    """Claim one shard of a queued pre-annotation run and pre-annotate its tasks with the live model."""
    from . import labelstudio

    settings = Settings.from_env()
    store = Ledger(settings.ledger_url).prediction_runs
    claimed = store.claim(run, shard, worker_id())
    if claimed is None:
        log.info("shard %s/%s is not queued any more (duplicate message); skipped", run, shard)
        return {"run": run, "shard": shard, "skipped": True}
    try:
        engine = _worker_engine(settings, claimed.project)
        report = labelstudio.predict_project(
            labelstudio.client(settings), settings, claimed.project, engine, only_missing=claimed.only_missing,
            only_unlabeled=claimed.only_unlabeled, task_ids=claimed.task_ids, ahead=claimed.ahead,
            done_since=claimed.run_created_at if claimed.attempts > 1 else None, batch_tasks=16, progress=False,
            on_batch=lambda: store.heartbeat(claimed))
    except Exception as exc:
        log.exception("shard %s/%s of project %s failed", run, shard, claimed.project)
        store.finish(claimed, "failed", reason=describe_error(exc))
        return {"run": run, "shard": shard, "state": "failed", "reason": describe_error(exc)}
    reason = "; ".join(f"task {t}: {r}" for t, r in sorted(report.failed.items()))[:2000] or None
    if not store.finish(claimed, "done", predicted=report.predicted, skipped=report.skipped,
                        failed=len(report.failed), version=engine.model_version, reason=reason):
        log.warning("shard %s/%s was taken over while this worker was silent; its counts are the new holder's",
                    run, shard)
    log.info("shard %s/%s of project %s: %d predicted, %d skipped, %d failed", run, shard, claimed.project,
             report.predicted, report.skipped, len(report.failed))
    return {"run": run, "shard": shard, "state": "done"} | asdict(report)


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


def _worker_gone(worker: str | None, heartbeat_at: float | None) -> bool:
    """A worker is gone when it ran on this host and its pid is dead, or when its last heartbeat is
    older than :data:`STALE_HEARTBEAT_S` (a worker on another host)."""
    worker_host, _, pid = (worker or "").rpartition(":")
    dead_here = worker_host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))
    silent = heartbeat_at is not None and time.time() - heartbeat_at > STALE_HEARTBEAT_S
    return dead_here or silent


def recover_jobs(settings: Settings, enqueue=None, *, on_start: bool = False) -> list[tuple[int, str]]:
    """Requeue or fail running training jobs whose worker is gone; on worker start also re-send queued jobs."""
    ledger = Ledger(settings.ledger_url)
    enqueue = enqueue or enqueue_training_job
    changed = []
    for job in ledger.jobs.list(states=("running",), limit=1000):
        if _worker_gone(job.worker, job.heartbeat_at):
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


def recover_shards(settings: Settings, enqueue=None, *, on_start: bool = False) -> list[tuple[int, int, str]]:
    """The same for pre-annotation shards: requeue (or fail) those of dead workers; on start re-send queued ones."""
    store = Ledger(settings.ledger_url).prediction_runs
    enqueue = enqueue or functools.partial(enqueue_prediction_shard, settings)
    changed = []
    for shard in store.list(("running",)):
        if _worker_gone(shard.worker, shard.heartbeat_at):
            reason = f"worker {shard.worker} stopped (attempt {shard.attempts} of {SHARD_MAX_ATTEMPTS})"
            state = store.requeue_or_fail(shard.run, shard.shard, reason, SHARD_MAX_ATTEMPTS)
            log.warning("shard %s/%s: %s → %s", shard.run, shard.shard, reason, state)
            changed.append((shard.run, shard.shard, state))
            if state == "queued":
                enqueue(shard.run, shard.shard)
    if on_start:
        for shard in store.list(("queued",)):
            if (shard.run, shard.shard, "queued") not in changed:
                enqueue(shard.run, shard.shard)
    return changed


def register(queue: Huey) -> dict:
    """The jobs, by name."""
    return {
        "predict-shard": queue.task(name="predict-shard")(run_prediction_shard),
        "train": queue.task(name="train")(run_training_job),
    }


def enqueue_prediction_shard(settings: Settings, run: int, shard: int) -> None:
    """Hand one shard of a pre-annotation run (already in state ``queued``) to the workers."""
    register(open_queue(settings))["predict-shard"](run, shard)


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
        recover_shards(Settings.from_env(), on_start=True)
    except Exception:
        log.exception("job recovery at start-up failed")


def _recover_periodically() -> None:
    recover_jobs(Settings.from_env())
    recover_shards(Settings.from_env())


@functools.cache
def consumer_queue() -> Huey:
    """The worker's queue with its jobs and recovery hooks, opened on first use (not at import).
    Also where a worker takes its GPU (``WORKER_GPU``), before anything initialises CUDA."""
    settings = Settings.from_env()
    pin_worker_gpu(settings.worker_gpu, StackPaths(settings.home).run / "gpus")
    queue = open_queue(settings)
    register(queue)
    queue.on_startup()(_recover_on_start)
    queue.periodic_task(crontab(minute="*"), name="recover-jobs")(_recover_periodically)
    return queue


def __getattr__(name: str) -> Huey:
    """``huey_consumer loopscribe.jobs.huey`` reads this attribute; its environment is set by `up`."""
    if name == "huey":
        return consumer_queue()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
