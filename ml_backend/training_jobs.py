"""The training-job state machine: at most one queued-or-running job per project, claimed once.

States (:class:`JobState`)::

    queued ──claim──▶ running ──finish──▶ promoted | rejected | inconclusive | failed
      ▲                  │
      └──requeue_or_fail─┘   (its worker died: queued again while attempts remain, else failed)

A job covers the corrections recorded up to its ``cutoff_seq``; "corrections since the last
training" count from the newest cut-off of a job that did not fail, so a failed job gives its
corrections back to the next one.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, RowMapping

from .corrections import CorrectionsStore
from .database import Database
from .errors import LoopscribeError
from .schema import jobs_table as jobs


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    INCONCLUSIVE = "inconclusive"  # the candidate looked better, but not knowably so: not enough evidence
    FAILED = "failed"


ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)
PROGRESS_FIELDS = ("stage", "step", "total_steps", "loss", "eta_s", "version")


@dataclass(frozen=True)
class Job:
    id: int
    project: int
    state: str
    trigger: str
    params: dict
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    attempts: int
    worker: str | None
    cutoff_seq: int | None
    stage: str | None
    step: int | None
    total_steps: int | None
    loss: float | None
    eta_s: float | None
    version: str | None
    reason: str | None

    @classmethod
    def from_row(cls, row: RowMapping | Mapping[str, Any]) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"] or "{}")
        return cls(**d)


class JobStore:
    def __init__(self, database: Database):
        self.db = database

    @staticmethod
    def _last_cutoff(db: Connection, project: int) -> int:
        return int(db.execute(select(func.max(jobs.c.cutoff_seq))
                              .where(jobs.c.project == project, jobs.c.state != JobState.FAILED.value)).scalar() or 0)

    @staticmethod
    def _row(db: Connection, job_id: int) -> Job | None:
        row = db.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return Job.from_row(row) if row else None

    def corrections_since_training(self, project: int) -> int:
        """Corrections changed after the newest cut-off of a job of ``project`` that did not fail."""
        with self.db.connect() as db:
            return CorrectionsStore.count_since(db, project, self._last_cutoff(db, project))

    def request(self, project: int, trigger: str, params: dict | None = None,
                min_corrections: int | None = None) -> tuple[Job | None, bool]:
        """Queue a training job unless one is queued or running (then that one is returned: coalesced).

        With ``min_corrections`` the job is only created when enough corrections arrived since
        the last training. Returns ``(job, created)``; ``job`` is None when the threshold is not reached.
        """
        with self.db.transaction() as db:
            active = db.execute(select(jobs).where(jobs.c.project == project, jobs.c.state.in_(ACTIVE))
                                .order_by(jobs.c.id).limit(1)).mappings().first()
            if active is not None:
                return Job.from_row(active), False
            if min_corrections is not None and \
                    CorrectionsStore.count_since(db, project, self._last_cutoff(db, project)) < min_corrections:
                return None, False
            job_id = db.execute(insert(jobs).values(
                project=project, state=JobState.QUEUED.value, trigger=trigger, params=json.dumps(params or {}),
                created_at=time.time(), cutoff_seq=Database.current_seq(db)).returning(jobs.c.id)).scalar_one()
            return self._row(db, job_id), True

    def claim(self, job_id: int, worker: str) -> Job | None:
        """Move a queued job to running for this worker; None if it is not queued (duplicate delivery)."""
        now = time.time()
        with self.db.transaction() as db:
            claimed = db.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
                                 .values(state=JobState.RUNNING.value, worker=worker, started_at=now, heartbeat_at=now,
                                         attempts=jobs.c.attempts + 1, stage="starting", reason=None))
            return self._row(db, job_id) if claimed.rowcount else None

    def progress(self, job_id: int, **fields: object) -> None:
        """Update stage / step / total_steps / loss / eta_s / version (and the heartbeat)."""
        values = {k: fields[k] for k in PROGRESS_FIELDS if k in fields}  # columns from the allow-list only
        with self.db.connect() as db:
            db.execute(update(jobs).where(jobs.c.id == job_id).values(heartbeat_at=time.time(), **values))

    def finish(self, job_id: int, state: JobState | str, *, version: str | None = None,
               reason: str | None = None) -> None:
        with self.db.connect() as db:
            db.execute(update(jobs).where(jobs.c.id == job_id).values(
                state=str(state), version=func.coalesce(version, jobs.c.version), reason=reason,
                finished_at=time.time(), stage="done", eta_s=0))

    def requeue_or_fail(self, job_id: int, reason: str, max_attempts: int) -> str:
        """A job whose worker died: queued again while attempts remain, else failed with the reason."""
        this = update(jobs).where(jobs.c.id == job_id)
        with self.db.transaction() as db:
            job = self._row(db, job_id)
            if job is None or job.state != JobState.RUNNING.value:
                return job.state if job else "missing"
            if job.attempts < max_attempts:
                db.execute(this.values(state=JobState.QUEUED.value, worker=None, reason=f"retrying: {reason}",
                                       stage="requeued"))
                return JobState.QUEUED.value
            db.execute(this.values(state=JobState.FAILED.value, reason=reason, finished_at=time.time(), stage="done"))
            return JobState.FAILED.value

    def require(self, job_id: int) -> Job:
        """The job, which must exist (a job id this process was handed)."""
        job = self.get(job_id)
        if job is None:
            raise LoopscribeError(f"training job {job_id} is not in the ledger")
        return job

    def get(self, job_id: int) -> Job | None:
        with self.db.connect() as db:
            return self._row(db, job_id)

    def list(self, project: int | None = None, states: tuple[str, ...] | None = None,
             limit: int = 20) -> builtins.list[Job]:
        query = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if project is not None:
            query = query.where(jobs.c.project == project)
        if states:
            query = query.where(jobs.c.state.in_([str(s) for s in states]))
        with self.db.connect() as db:
            return [Job.from_row(r) for r in db.execute(query).mappings()]

    def projects(self) -> builtins.list[int]:
        with self.db.connect() as db:
            return list(db.execute(select(jobs.c.project).distinct()).scalars())
