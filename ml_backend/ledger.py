"""The corrections ledger: Label Studio annotation webhooks folded into one row per annotation.

Recording is idempotent and order-independent, so Label Studio's at-least-once,
unordered delivery ends in the right state:

* an event older than the row it would replace (by the annotation's ``updated_at``) is ignored,
  so a replayed or late ``ANNOTATION_CREATED`` never undoes an ``ANNOTATION_UPDATED``;
* a delete leaves a tombstone (annotation ids are never reused), so a create that
  arrives after its delete stays deleted;
* a replay with the same content changes nothing.

The same SQLite file holds the training jobs (one queued-or-running job per project,
triggers coalesce), their progress, and the frozen held-out split.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .annotations import classify, extract
from .label_config import LabelConfigError, parse_label_config

ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}
DELETE_ACTION = "ANNOTATIONS_DELETED"
ACTIVE_JOB_STATES = ("queued", "running")

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY,          -- Label Studio annotation id
    project INTEGER NOT NULL,
    task INTEGER,
    updated_at REAL NOT NULL,        -- the annotation's own updated_at (orders events)
    kind TEXT NOT NULL,              -- correction | verified | cancelled | deleted
    text TEXT, language TEXT, predicted_text TEXT, predicted_language TEXT,
    model_version TEXT,              -- of the prediction it started from
    changed_seq INTEGER NOT NULL     -- ledger sequence of the last content change
);
CREATE INDEX IF NOT EXISTS annotations_project ON annotations(project, kind, changed_seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project INTEGER NOT NULL,
    state TEXT NOT NULL,             -- queued | running | promoted | rejected | failed
    trigger TEXT NOT NULL,           -- threshold | label-studio | cli
    params TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,                     -- host:pid running it
    cutoff_seq INTEGER,              -- corrections up to this sequence are covered by this job
    stage TEXT, step INTEGER, total_steps INTEGER, loss REAL, eta_s REAL,
    version TEXT, reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_project ON jobs(project, state);
CREATE TABLE IF NOT EXISTS splits (
    project INTEGER NOT NULL, task INTEGER NOT NULL, split TEXT NOT NULL,
    PRIMARY KEY (project, task)
);
"""


def _timestamp(value) -> float:
    """Label Studio's ISO ``updated_at`` (or epoch seconds) as epoch seconds; 0 when missing."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


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
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["params"] = json.loads(d["params"] or "{}")
        return cls(**d)


@dataclass(frozen=True)
class Recorded:
    """What one webhook did to the ledger."""

    action: str
    project: int | None
    changed: int  # annotation rows whose state changed (0 for a replay)


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (BEGIN IMMEDIATE) so check-then-write is atomic."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        db.execute("INSERT OR IGNORE INTO counters(name, value) VALUES ('seq', 0)")
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
        return db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    # ---- webhooks -----------------------------------------------------------------------------

    def record(self, event: dict) -> Recorded:
        """Fold one Label Studio webhook event in. Events other than annotation changes are ignored."""
        action = str(event.get("action"))
        project = (event.get("project") or {}).get("id") if isinstance(event.get("project"), dict) else None
        if action in ANNOTATION_ACTIONS and isinstance(event.get("annotation"), dict):
            return Recorded(action, project, self._upsert(event["annotation"], event))
        if action == DELETE_ACTION:
            ids = [a.get("id") for a in event.get("annotations") or [] if isinstance(a, dict)]
            return Recorded(action, project, self._delete([int(i) for i in ids if i is not None], project))
        return Recorded(action, project, 0)

    @staticmethod
    def _classify(annotation: dict, event: dict) -> dict:
        config = None
        label_config = (event.get("project") or {}).get("label_config")
        if label_config:
            try:
                config = parse_label_config(label_config)
            except LabelConfigError:
                config = None
        prediction = annotation.get("prediction") or {}
        human = extract(annotation.get("result"), config)
        predicted = extract(prediction.get("result"), config) if prediction.get("result") else None
        if annotation.get("was_cancelled"):
            kind = "cancelled"
        else:
            kind = classify(human, predicted)
        return {
            "kind": kind, "text": human.text, "language": human.language,
            "predicted_text": predicted.text if predicted else None,
            "predicted_language": predicted.language if predicted else None,
            "model_version": prediction.get("model_version"),
        }

    def _upsert(self, annotation: dict, event: dict) -> int:
        ann_id = int(annotation["id"])
        task = annotation.get("task")
        task = task.get("id") if isinstance(task, dict) else task
        if task is None and isinstance(event.get("task"), dict):
            task = event["task"].get("id")
        project = annotation.get("project") or (event.get("project") or {}).get("id")
        updated = _timestamp(annotation.get("updated_at") or annotation.get("created_at"))
        row = self._classify(annotation, event)
        with self._transaction() as db:
            old = db.execute("SELECT * FROM annotations WHERE id = ?", (ann_id,)).fetchone()
            if old is not None and (old["kind"] == "deleted" or old["updated_at"] > updated):
                return 0  # deleted for good, or a stale (out-of-order) event
            fields = ("kind", "text", "language", "predicted_text", "predicted_language", "model_version")
            if old is not None and all(old[f] == row[f] for f in fields):
                if old["updated_at"] != updated:
                    db.execute("UPDATE annotations SET updated_at = ? WHERE id = ?", (updated, ann_id))
                return 0  # a replay, or a save that changed nothing
            seq = self._next_seq(db)
            db.execute(
                "INSERT OR REPLACE INTO annotations(id, project, task, updated_at, kind, text, language,"
                " predicted_text, predicted_language, model_version, changed_seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ann_id, project, task, updated, *(row[f] for f in fields), seq),
            )
            return 1

    def _delete(self, ids: list[int], project: int | None) -> int:
        changed = 0
        with self._transaction() as db:
            for ann_id in ids:
                old = db.execute("SELECT kind FROM annotations WHERE id = ?", (ann_id,)).fetchone()
                if old is not None and old["kind"] == "deleted":
                    continue
                seq = self._next_seq(db)
                if old is None:
                    db.execute("INSERT INTO annotations(id, project, updated_at, kind, changed_seq)"
                               " VALUES (?, ?, ?, 'deleted', ?)", (ann_id, project or 0, float("inf"), seq))
                else:
                    db.execute("UPDATE annotations SET kind = 'deleted', updated_at = ?, changed_seq = ?, task = NULL,"
                               " text = NULL, language = NULL, predicted_text = NULL, predicted_language = NULL,"
                               " model_version = NULL WHERE id = ?", (float("inf"), seq, ann_id))
                changed += 1
        return changed

    def snapshot(self, project: int | None = None) -> list[dict]:
        """The ledger's annotation state (without bookkeeping columns): what idempotency is judged on."""
        where, args = ("WHERE project = ?", (project,)) if project is not None else ("", ())
        with self._connect() as db:
            rows = db.execute(f"SELECT id, project, task, kind, text, language, predicted_text,"
                              f" predicted_language, model_version FROM annotations {where} ORDER BY id", args)
            return [dict(r) for r in rows]

    def counts(self, project: int) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT kind, COUNT(*) FROM annotations WHERE project = ? GROUP BY kind", (project,))
            return {kind: n for kind, n in rows}

    def corrections_since_training(self, project: int) -> int:
        """Corrections changed after the newest training job of the project took its snapshot."""
        with self._connect() as db:
            return self._corrections_since(db, project)

    @staticmethod
    def _corrections_since(db: sqlite3.Connection, project: int) -> int:
        cutoff = db.execute("SELECT MAX(cutoff_seq) FROM jobs WHERE project = ?", (project,)).fetchone()[0] or 0
        return db.execute("SELECT COUNT(*) FROM annotations WHERE project = ? AND kind = 'correction'"
                          " AND changed_seq > ?", (project, cutoff)).fetchone()[0]

    # ---- training jobs ------------------------------------------------------------------------

    def request_training(self, project: int, trigger: str, params: dict | None = None,
                         min_corrections: int | None = None) -> tuple[Job | None, bool]:
        """Queue a training job unless one is queued or running (then that one is returned: coalesced).

        With ``min_corrections`` the job is only created when enough corrections arrived since
        the last job. Returns ``(job, created)``; ``job`` is None when the threshold is not reached.
        """
        with self._transaction() as db:
            active = db.execute(f"SELECT * FROM jobs WHERE project = ? AND state IN {ACTIVE_JOB_STATES}"
                                " ORDER BY id LIMIT 1", (project,)).fetchone()
            if active is not None:
                return Job.from_row(active), False
            if min_corrections is not None and self._corrections_since(db, project) < min_corrections:
                return None, False
            seq = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
            cur = db.execute("INSERT INTO jobs(project, state, trigger, params, created_at, cutoff_seq)"
                             " VALUES (?, 'queued', ?, ?, ?, ?)",
                             (project, trigger, json.dumps(params or {}), time.time(), seq[0] if seq else 0))
            job = db.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone()
            return Job.from_row(job), True

    def claim(self, job_id: int, worker: str) -> Job | None:
        """Move a queued job to running for this worker; None if it is not queued (duplicate delivery)."""
        now = time.time()
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET state = 'running', worker = ?, started_at = ?, heartbeat_at = ?,"
                             " attempts = attempts + 1, stage = 'starting', reason = NULL"
                             " WHERE id = ? AND state = 'queued'", (worker, now, now, job_id))
            if cur.rowcount == 0:
                return None
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def progress(self, job_id: int, **fields) -> None:
        """Update stage / step / total_steps / loss / eta_s (and the heartbeat)."""
        allowed = {"stage", "step", "total_steps", "loss", "eta_s", "version"}
        fields = {k: v for k, v in fields.items() if k in allowed}
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET heartbeat_at = ?{', ' + sets if sets else ''} WHERE id = ?",
                       (time.time(), *fields.values(), job_id))

    def finish(self, job_id: int, state: str, *, version: str | None = None, reason: str | None = None) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET state = ?, version = COALESCE(?, version), reason = ?, finished_at = ?,"
                       " stage = 'done', eta_s = 0 WHERE id = ?", (state, version, reason, time.time(), job_id))

    def requeue_or_fail(self, job_id: int, reason: str, max_attempts: int) -> str:
        """A job whose worker died: queued again while attempts remain, else failed with the reason."""
        with self._transaction() as db:
            row = db.execute("SELECT attempts, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "running":
                return row["state"] if row else "missing"
            if row["attempts"] < max_attempts:
                db.execute("UPDATE jobs SET state = 'queued', worker = NULL, reason = ?, stage = 'requeued'"
                           " WHERE id = ?", (f"retrying: {reason}", job_id))
                return "queued"
            db.execute("UPDATE jobs SET state = 'failed', reason = ?, finished_at = ?, stage = 'done'"
                       " WHERE id = ?", (reason, time.time(), job_id))
            return "failed"

    def job(self, job_id: int) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return Job.from_row(row) if row else None

    def jobs(self, project: int | None = None, states: tuple[str, ...] | None = None, limit: int = 20) -> list[Job]:
        clauses, args = [], []
        if project is not None:
            clauses.append("project = ?")
            args.append(project)
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*args, limit))
            return [Job.from_row(r) for r in rows]

    def projects(self) -> list[int]:
        with self._connect() as db:
            rows = db.execute("SELECT project FROM annotations UNION SELECT project FROM jobs")
            return sorted(r[0] for r in rows if r[0])

    # ---- frozen held-out split ------------------------------------------------------------------

    def freeze_splits(self, project: int, assignments: dict[int, str]) -> dict[int, str]:
        """Record first-seen splits; a task keeps the split it was first given. Returns all splits."""
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO splits(project, task, split) VALUES (?, ?, ?)",
                           [(project, t, s) for t, s in assignments.items()])
            rows = db.execute("SELECT task, split FROM splits WHERE project = ?", (project,))
            return {task: split for task, split in rows}
