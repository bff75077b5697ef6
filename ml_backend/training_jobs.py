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
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum

from .corrections import CorrectionsStore
from .database import Database
from .errors import LoopscribeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project INTEGER NOT NULL,
    state TEXT NOT NULL,             -- JobState
    trigger TEXT NOT NULL,           -- threshold | label-studio | cli | …
    params TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,                     -- host:pid running it
    cutoff_seq INTEGER,              -- corrections up to this sequence are covered by this job
    stage TEXT, step INTEGER, total_steps INTEGER, loss REAL, eta_s REAL,
    version TEXT, reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_project ON jobs(project, state);
"""


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
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"] or "{}")
        return cls(**d)


class JobStore:
    def __init__(self, database: Database):
        self.db = database

    @staticmethod
    def _last_cutoff(db: sqlite3.Connection, project: int) -> int:
        row = db.execute("SELECT MAX(cutoff_seq) FROM jobs WHERE project = ? AND state != ?",
                         (project, JobState.FAILED.value)).fetchone()
        return int(row[0] or 0)

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
            active = db.execute("SELECT * FROM jobs WHERE project = ? AND state IN (?, ?) ORDER BY id LIMIT 1",
                                (project, *ACTIVE)).fetchone()
            if active is not None:
                return Job.from_row(active), False
            if min_corrections is not None and \
                    CorrectionsStore.count_since(db, project, self._last_cutoff(db, project)) < min_corrections:
                return None, False
            cur = db.execute("INSERT INTO jobs(project, state, trigger, params, created_at, cutoff_seq)"
                             " VALUES (?, ?, ?, ?, ?, ?)",
                             (project, JobState.QUEUED.value, trigger, json.dumps(params or {}), time.time(),
                              Database.current_seq(db)))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone()), True

    def claim(self, job_id: int, worker: str) -> Job | None:
        """Move a queued job to running for this worker; None if it is not queued (duplicate delivery)."""
        now = time.time()
        with self.db.transaction() as db:
            cur = db.execute("UPDATE jobs SET state = ?, worker = ?, started_at = ?, heartbeat_at = ?,"
                             " attempts = attempts + 1, stage = 'starting', reason = NULL WHERE id = ? AND state = ?",
                             (JobState.RUNNING.value, worker, now, now, job_id, JobState.QUEUED.value))
            if cur.rowcount == 0:
                return None
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def progress(self, job_id: int, **fields: object) -> None:
        """Update stage / step / total_steps / loss / eta_s / version (and the heartbeat)."""
        names = [k for k in PROGRESS_FIELDS if k in fields]  # column names from the allow-list only
        sets = "".join(f", {k} = ?" for k in names)
        with self.db.connect() as db:
            db.execute(f"UPDATE jobs SET heartbeat_at = ?{sets} WHERE id = ?",
                       (time.time(), *(fields[k] for k in names), job_id))

    def finish(self, job_id: int, state: JobState | str, *, version: str | None = None,
               reason: str | None = None) -> None:
        with self.db.connect() as db:
            db.execute("UPDATE jobs SET state = ?, version = COALESCE(?, version), reason = ?, finished_at = ?,"
                       " stage = 'done', eta_s = 0 WHERE id = ?", (str(state), version, reason, time.time(), job_id))

    def requeue_or_fail(self, job_id: int, reason: str, max_attempts: int) -> str:
        """A job whose worker died: queued again while attempts remain, else failed with the reason."""
        with self.db.transaction() as db:
            row = db.execute("SELECT attempts, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != JobState.RUNNING.value:
                return row["state"] if row else "missing"
            if row["attempts"] < max_attempts:
                db.execute("UPDATE jobs SET state = ?, worker = NULL, reason = ?, stage = 'requeued' WHERE id = ?",
                           (JobState.QUEUED.value, f"retrying: {reason}", job_id))
                return JobState.QUEUED.value
            db.execute("UPDATE jobs SET state = ?, reason = ?, finished_at = ?, stage = 'done' WHERE id = ?",
                       (JobState.FAILED.value, reason, time.time(), job_id))
            return JobState.FAILED.value

    def require(self, job_id: int) -> Job:
        """The job, which must exist (a job id this process was handed)."""
        job = self.get(job_id)
        if job is None:
            raise LoopscribeError(f"training job {job_id} is not in the ledger")
        return job

    def get(self, job_id: int) -> Job | None:
        with self.db.connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return Job.from_row(row) if row else None

    def list(self, project: int | None = None, states: tuple[str, ...] | None = None,
             limit: int = 20) -> builtins.list[Job]:
        wanted = [str(s) for s in states or ()]
        query = ("SELECT * FROM jobs WHERE (? IS NULL OR project = ?)"
                 f" AND (? = 0 OR state IN ({', '.join('?' * len(wanted)) or 'NULL'}))"
                 " ORDER BY id DESC LIMIT ?")
        with self.db.connect() as db:
            rows = db.execute(query, (project, project, len(wanted), *wanted, limit))
            return [Job.from_row(r) for r in rows]

    def projects(self) -> builtins.list[int]:
        with self.db.connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT project FROM jobs")]
