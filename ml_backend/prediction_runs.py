"""Bulk pre-annotation split into shards, so any number of workers can share one project.

A *run* is one ``loopscribe predict --project N --queue``: the project's task ids at that moment,
cut into shards of at most ``shard_size`` tasks. Each shard moves through::

    queued ──claim──▶ running ──finish──▶ done | failed
      ▲                  │
      └──requeue_or_fail─┘   (its worker died: queued again while attempts remain, else failed)

Claiming is a conditional update in a write transaction, so a shard runs on exactly one worker
however often its queue message is delivered. A run is finished when no shard is queued or
running; a project has at most one unfinished run, and asking again resumes it instead of
starting another. Pre-annotating a task twice is avoided by the predictor itself (a task that
already holds the live version's prediction is skipped), which makes a re-run shard idempotent.
"""

from __future__ import annotations

import builtins
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, RowMapping

from .database import Database
from .schema import prediction_runs_table as runs
from .schema import prediction_shards_table as shards


class ShardState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


UNFINISHED = (ShardState.QUEUED.value, ShardState.RUNNING.value)
SHARD_SIZE = 64  # tasks per shard by default (``loopscribe predict --queue --shard-size``)
SHARD_MAX_ATTEMPTS = 3  # a shard whose worker died this many times is failed with the reason


@dataclass(frozen=True)
class Shard:
    run: int
    shard: int
    project: int
    task_ids: list[int]
    state: str
    worker: str | None
    attempts: int
    heartbeat_at: float | None
    run_created_at: float
    only_missing: bool
    only_unlabeled: bool
    reason: str | None = None
    ahead: float | None = None  # the run's ahead cutoff (ml_backend.splits.ahead_cutoff); None: runs before it


@dataclass
class RunProgress:
    """What ``loopscribe status`` shows of a run: shards by state, task counts of the shards that ended."""

    run: int
    project: int
    tasks: int
    shards: int
    created_at: float
    finished_at: float | None
    states: dict[str, int] = field(default_factory=dict)
    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    workers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def tasks_finished(self) -> int:
        return self.predicted + self.skipped + self.failed

    def summary(self) -> str:
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.states.items()))
        line = (f"run {self.run}: {self.states.get('done', 0)}/{self.shards} shards done ({states}); "
                f"{self.tasks_finished}/{self.tasks} tasks: {self.predicted} predicted, {self.skipped} skipped, "
                f"{self.failed} failed")
        if self.workers:
            line += f"; workers {', '.join(self.workers)}"
        return line


class PredictionRunStore:
    def __init__(self, database: Database):
        self.db = database

    def start(self, project: int, task_ids: Sequence[int], shard_size: int, *, only_missing: bool = True,
              only_unlabeled: bool = False, ahead: float | None = None) -> tuple[int, bool]:
        """A new run over ``task_ids`` in shards of ``shard_size``, unless the project has an unfinished run:
        then that one (resumed, not duplicated). Returns ``(run id, created)``.

        ``ahead`` is the project's ahead cutoff, decided once when the run is planned: every shard scores
        with it, so no shard lists the project again and all of a run's scores agree."""
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        with self.db.transaction() as db:
            active = self._unfinished(db, project)
            if active is not None:
                return int(active), False
            ids = [int(t) for t in task_ids]
            pieces = [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]
            now = time.time()
            run_id = db.execute(insert(runs).values(
                project=project, options=json.dumps({"only_missing": only_missing, "only_unlabeled": only_unlabeled,
                                                     "ahead": ahead}),
                tasks=len(ids), shards=len(pieces), created_at=now,
                finished_at=None if pieces else now).returning(runs.c.id)).scalar_one()
            if pieces:
                db.execute(insert(shards), [{"run": run_id, "shard": n, "task_ids": json.dumps(p),
                                             "state": ShardState.QUEUED.value} for n, p in enumerate(pieces)])
            return int(run_id), True

    @staticmethod
    def _unfinished(db: Connection, project: int) -> int | None:
        run = db.execute(select(runs.c.id).where(runs.c.project == project, runs.c.finished_at.is_(None))
                         .order_by(runs.c.id).limit(1)).scalar()
        return int(run) if run is not None else None

    def unfinished(self, project: int) -> int | None:
        """The project's unfinished run, if any (the one :meth:`start` would resume)."""
        with self.db.connect() as db:
            return self._unfinished(db, project)

    # each shard with its run's project, options and start time, which the worker needs to run it
    _SHARDS = select(shards, runs.c.project, runs.c.options, runs.c.created_at.label("run_created_at")).join(
        runs, runs.c.id == shards.c.run)

    @classmethod
    def _shard(cls, db: Connection, run: int, shard: int) -> Shard | None:
        row = db.execute(cls._SHARDS.where(shards.c.run == run, shards.c.shard == shard)).mappings().first()
        return cls._from_row(row) if row is not None else None

    @staticmethod
    def _from_row(row: RowMapping) -> Shard:
        options = json.loads(row["options"])
        return Shard(run=row["run"], shard=row["shard"], project=row["project"], task_ids=json.loads(row["task_ids"]),
                     state=row["state"], worker=row["worker"], attempts=row["attempts"],
                     heartbeat_at=row["heartbeat_at"], run_created_at=row["run_created_at"],
                     only_missing=bool(options.get("only_missing", True)),
                     only_unlabeled=bool(options.get("only_unlabeled", False)), reason=row["reason"],
                     ahead=options.get("ahead"))

    def get(self, run: int, shard: int) -> Shard | None:
        with self.db.connect() as db:
            return self._shard(db, run, shard)

    def claim(self, run: int, shard: int, worker: str) -> Shard | None:
        """Move a queued shard to running for ``worker``; None when it is not queued (a duplicate delivery)."""
        now = time.time()
        with self.db.transaction() as db:
            claimed = db.execute(update(shards).where(shards.c.run == run, shards.c.shard == shard,
                                                      shards.c.state == ShardState.QUEUED.value)
                                 .values(state=ShardState.RUNNING.value, worker=worker, started_at=now,
                                         heartbeat_at=now, attempts=shards.c.attempts + 1))
            return self._shard(db, run, shard) if claimed.rowcount else None

    @staticmethod
    def _held_by(claimed: Shard):
        """The shard row as long as this claim holds it: running, same worker, same attempt."""
        return update(shards).where(shards.c.run == claimed.run, shards.c.shard == claimed.shard,
                                    shards.c.state == ShardState.RUNNING.value, shards.c.worker == claimed.worker,
                                    shards.c.attempts == claimed.attempts)

    def heartbeat(self, claimed: Shard) -> bool:
        """The claim's worker is alive; False when the shard was taken from it (requeued after silence)."""
        with self.db.connect() as db:
            return bool(db.execute(self._held_by(claimed).values(heartbeat_at=time.time())).rowcount)

    def finish(self, claimed: Shard, state: ShardState | str, *, predicted: int = 0, skipped: int = 0,
               failed: int = 0, version: str | None = None, reason: str | None = None) -> bool:
        """End the shard this claim holds; the run ends with its last shard. False, and nothing written, when
        the shard was taken from this claim meanwhile (its worker fell silent and another took it over): the
        counts belong to whoever holds it now."""
        now = time.time()
        with self.db.transaction() as db:
            ended = db.execute(self._held_by(claimed).values(
                state=str(state), predicted=predicted, skipped=skipped, failed=failed, version=version,
                reason=reason, finished_at=now, heartbeat_at=now)).rowcount
            if ended:
                self._finish_run_if_done(db, claimed.run, now)
            return bool(ended)

    @staticmethod
    def _finish_run_if_done(db: Connection, run: int, now: float) -> None:
        left = db.execute(select(func.count()).select_from(shards)
                          .where(shards.c.run == run, shards.c.state.in_(UNFINISHED))).scalar_one()
        if not left:
            db.execute(update(runs).where(runs.c.id == run, runs.c.finished_at.is_(None)).values(finished_at=now))

    def requeue_or_fail(self, run: int, shard: int, reason: str, max_attempts: int) -> str:
        """A running shard whose worker died: queued again while attempts remain, else failed with the reason."""
        now = time.time()
        with self.db.transaction() as db:
            current = self._shard(db, run, shard)
            if current is None or current.state != ShardState.RUNNING.value:
                return current.state if current else "missing"
            this = update(shards).where(shards.c.run == run, shards.c.shard == shard)
            if current.attempts < max_attempts:
                db.execute(this.values(state=ShardState.QUEUED.value, worker=None, reason=f"retrying: {reason}"))
                return ShardState.QUEUED.value
            db.execute(this.values(state=ShardState.FAILED.value, reason=reason, finished_at=now))
            self._finish_run_if_done(db, run, now)
            return ShardState.FAILED.value

    def list(self, states: Sequence[str], run: int | None = None, limit: int = 10_000) -> list[Shard]:
        """Shards in ``states`` (of one run, or of every run), oldest first."""
        query = self._SHARDS.where(shards.c.state.in_([str(s) for s in states]))
        if run is not None:
            query = query.where(shards.c.run == run)
        with self.db.connect() as db:
            rows = db.execute(query.order_by(shards.c.run, shards.c.shard).limit(limit)).mappings().all()
        return [self._from_row(row) for row in rows]

    def progress(self, run: int) -> RunProgress | None:
        with self.db.connect() as db:
            row = db.execute(select(runs).where(runs.c.id == run)).mappings().first()
            if row is None:
                return None
            report = RunProgress(run=row["id"], project=row["project"], tasks=row["tasks"], shards=row["shards"],
                                 created_at=row["created_at"], finished_at=row["finished_at"])
            states: Counter[str] = Counter()
            workers: set[str] = set()
            for s in db.execute(select(shards).where(shards.c.run == run)).mappings():
                states[s["state"]] += 1
                report.predicted += s["predicted"] or 0
                report.skipped += s["skipped"] or 0
                report.failed += s["failed"] or 0
                workers |= {s["worker"]} if s["worker"] else set()
                if s["state"] == ShardState.FAILED.value and s["reason"]:
                    report.reasons.append(f"shard {s['shard']}: {s['reason']}")
            report.states, report.workers = dict(states), sorted(workers)
            return report

    def latest(self, project: int) -> RunProgress | None:
        """The project's newest run, finished or not."""
        with self.db.connect() as db:
            run = db.execute(select(func.max(runs.c.id)).where(runs.c.project == project)).scalar()
        return self.progress(int(run)) if run is not None else None

    def projects(self) -> builtins.list[int]:
        with self.db.connect() as db:
            return list(db.execute(select(runs.c.project).distinct()).scalars())
