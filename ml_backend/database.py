"""The SQLite database the stores share: connections, write transactions, schema, one sequence.

Every store (:mod:`~ml_backend.corrections`, :mod:`~ml_backend.training_jobs`,
:mod:`~ml_backend.splits`) takes a :class:`Database` and owns its own tables. Queries always
take parameters; nothing from a request is pasted into SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COUNTERS = "\nCREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"


class Database:
    def __init__(self, path: Path, schema: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(schema + COUNTERS)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (BEGIN IMMEDIATE) so check-then-write is atomic."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @staticmethod
    def next_seq(db: sqlite3.Connection) -> int:
        """The next value of the ledger-wide change sequence (inside the caller's transaction)."""
        db.execute("INSERT OR IGNORE INTO counters(name, value) VALUES ('seq', 0)")
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
        return int(db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0])

    @staticmethod
    def current_seq(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        return int(row[0]) if row else 0
