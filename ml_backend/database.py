"""The database the stores share: SQLite by default, PostgreSQL for teams (``DATABASE_URL``).

Every store (:mod:`~ml_backend.corrections`, :mod:`~ml_backend.training_jobs`,
:mod:`~ml_backend.splits`) takes a :class:`Database` and queries its own tables
(:mod:`ml_backend.schema`) through SQLAlchemy Core, so the same code runs on both engines.
Opening a database brings its schema to the newest Alembic revision first, which also
upgrades a ledger made before Alembic in place.

Writes are serialized: :meth:`Database.transaction` takes SQLite's write lock up front
(``BEGIN IMMEDIATE``) or a PostgreSQL transaction-level advisory lock, so every
check-then-write is atomic across threads, processes and machines, and the change sequence
(:meth:`Database.next_seq`) is handed out in commit order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, insert, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool

from .schema import counters_table

WRITER_LOCK = 0x4C53_4C47  # PostgreSQL advisory lock key of Loopscribe's ledger writers ("LSLG")
_migrated: set[str] = set()
_lock = threading.Lock()  # guards the engine cache
_migrating = threading.Lock()


def database_url(location: str | Path) -> str:
    """A SQLAlchemy URL for ``location``: a filesystem path is a SQLite file; ``postgresql://`` uses psycopg."""
    if isinstance(location, Path) or "://" not in location:
        return f"sqlite:///{Path(location).expanduser().resolve()}"
    url = make_url(location)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN is off: the "begin" hook emits ours
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get("loopscribe_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


_engines: dict[str, Engine] = {}


def _new_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _engine(url: str) -> Engine:
    """One engine (and connection pool) per database per process."""
    with _lock:
        if url not in _engines:
            _engines[url] = _new_engine(url)
        return _engines[url]


def _forget_pools_after_fork() -> None:
    """A forked worker (gunicorn, huey) must not share its parent's pooled connections."""
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_pools_after_fork)


class Database:
    def __init__(self, location: str | Path):
        self.url = database_url(location)
        self.engine = _engine(self.url)
        self._migrate()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None for a server database."""
        return Path(self.engine.url.database) if self.dialect == "sqlite" and self.engine.url.database else None

    def _migrate(self) -> None:
        """Bring the schema to Alembic's newest revision, once per process, under the writer lock."""
        with _migrating:
            if self.url in _migrated and (self.path is None or self.path.exists()):
                return
            with self.transaction() as db:
                config = Config()
                config.set_main_option("script_location", "ml_backend:migrations")
                config.attributes["connection"] = db
                command.upgrade(config, "head")
            _migrated.add(self.url)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads and single-statement writes, committed when the block ends."""
        with self.engine.begin() as db:
            yield db

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction holding the writer lock from its first statement, so check-then-write is atomic."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(loopscribe_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITER_LOCK})
                yield conn

    @staticmethod
    def next_seq(db: Connection) -> int:
        """The next value of the ledger-wide change sequence (inside the caller's write transaction)."""
        bumped = db.execute(update(counters_table).where(counters_table.c.name == "seq")
                            .values(value=counters_table.c.value + 1).returning(counters_table.c.value)).first()
        if bumped is not None:
            return int(bumped[0])
        db.execute(insert(counters_table).values(name="seq", value=1))
        return 1

    @staticmethod
    def current_seq(db: Connection) -> int:
        value = db.execute(select(counters_table.c.value).where(counters_table.c.name == "seq")).scalar()
        return int(value or 0)
