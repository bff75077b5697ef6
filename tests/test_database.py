"""The ledger's database: schema migrations (Alembic) and concurrency on a real PostgreSQL.

The PostgreSQL tests are marked ``distributed``: they start a real server on loopback
(``tests/servers.py``) and hit it from many threads and processes at once.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from ml_backend.database import Database, database_url
from ml_backend.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]

# The ledger as releases before Alembic created it (ml_backend/{corrections,training_jobs,splits,database}.py).
LEGACY_SCHEMA = """
CREATE TABLE annotations (id INTEGER PRIMARY KEY, project INTEGER NOT NULL, task INTEGER, updated_at REAL NOT NULL,
    kind TEXT NOT NULL, text TEXT, language TEXT, predicted_text TEXT, predicted_language TEXT, model_version TEXT,
    changed_seq INTEGER NOT NULL);
CREATE INDEX annotations_project ON annotations(project, kind, changed_seq);
CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, project INTEGER NOT NULL, state TEXT NOT NULL,
    trigger TEXT NOT NULL, params TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, started_at REAL,
    finished_at REAL, heartbeat_at REAL, attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, cutoff_seq INTEGER,
    stage TEXT, step INTEGER, total_steps INTEGER, loss REAL, eta_s REAL, version TEXT, reason TEXT);
CREATE INDEX jobs_project ON jobs(project, state);
CREATE TABLE splits (project INTEGER NOT NULL, task INTEGER NOT NULL, split TEXT NOT NULL,
    PRIMARY KEY (project, task));
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", "ml_backend:migrations")
    return str(ScriptDirectory.from_config(config).get_current_head())


def correction(ann: int, task: int, text: str, updated: str = "2026-11-25T10:00:00Z", project: int = 7) -> dict:
    def result(words: str) -> list[dict]:
        return [{"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": [words]}}]

    return {"action": "ANNOTATION_CREATED", "project": {"id": project}, "task": {"id": task},
            "annotation": {"id": ann, "task": task, "project": project, "result": result(text),
                           "updated_at": updated, "prediction": {"result": result("something else")}}}


def test_a_ledger_from_before_alembic_is_upgraded_in_place(tmp_path):
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.executescript(LEGACY_SCHEMA)
    old.execute("INSERT INTO annotations VALUES (5, 7, 50, 1.0, 'correction', 'Zorvex', 'en', 'Servex', 'en', 'v1', 3)")
    old.execute("INSERT INTO jobs(project, state, trigger, created_at, cutoff_seq) VALUES (7, 'promoted', 'cli', 1, 2)")
    old.execute("INSERT INTO splits VALUES (7, 50, 'heldout')")
    old.execute("INSERT INTO counters VALUES ('seq', 3)")
    old.commit()
    old.close()

    ledger = Ledger(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
    assert ledger.corrections.snapshot()[0]["text"] == "Zorvex"
    assert ledger.jobs.list()[0].state == "promoted" and ledger.splits.freeze(7, {50: "train"}) == {50: "heldout"}
    assert ledger.jobs.corrections_since_training(7) == 1  # changed at 3, after the old job's cut-off 2
    ledger.corrections.record(correction(6, 60, "Kavoria"))
    with ledger.db.connect() as db:
        assert Database.current_seq(db) == 4  # the old sequence goes on
    job, created = ledger.jobs.request(7, "cli")
    assert created and job.id == 2


def test_urls_name_the_engine(tmp_path):
    assert database_url(tmp_path / "l.db") == f"sqlite:///{tmp_path / 'l.db'}"
    assert database_url("postgresql://u:p@db:5432/ls") == "postgresql+psycopg://u:p@db:5432/ls"
    assert Ledger(str(tmp_path / "x.db")).db.path == tmp_path / "x.db"


# ---- a real PostgreSQL -----------------------------------------------------------------------------


def _burst(url: str, events: list[dict], threads: int) -> int:
    """Record ``events`` from ``threads`` threads (each takes every ``threads``-th); rows changed."""
    ledger = Ledger(url)
    changed = [0] * threads

    def send(i: int) -> None:
        for event in events[i::threads]:
            changed[i] += ledger.corrections.record(event).changed

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(changed)


@pytest.mark.distributed
def test_webhook_bursts_from_several_replicas_count_each_annotation_once(postgres_url):
    """3 processes (backend replicas) × 4 threads deliver 200 annotations, every event three times, created and
    then corrected, in shuffled order (the deliveries `bench ledger` times): each annotation ends as its newest
    version, counted once."""
    from servers import fresh_database

    from loopscribe.bench.ledger import deliveries

    url = fresh_database(postgres_url)
    Ledger(url)  # migrate once before the burst
    events = deliveries(200, project=7)
    assert len(events) == 1200
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(3) as pool:
        changed = sum(pool.starmap(_burst, [(url, events[i::3], 4) for i in range(3)]))
    ledger = Ledger(url)
    rows = ledger.corrections.snapshot(7)
    assert len(rows) == 200 and all(r["text"] == f"second {r['id']}" for r in rows)
    assert ledger.corrections.counts(7) == {"correction": 200}
    assert 200 <= changed <= 400  # each annotation changed once or twice (its create may come after its update)
    with create_engine(database_url(url)).connect() as db:
        seqs = [r[0] for r in db.execute(text("SELECT changed_seq FROM annotations"))]
        assert len(set(seqs)) == 200 and db.execute(text("SELECT value FROM counters")).scalar() == changed


@pytest.mark.distributed
def test_a_webhook_while_postgresql_is_down_gets_503_and_retry_after(settings, tmp_path):
    """The backend's own database gone (its server stopped): a clear 503 telling Label Studio to retry, not a 500,
    and the event is in the audit log."""
    from servers import postgres_server

    from ml_backend.app import create_app

    class Idle:  # webhooks never reach the model
        model_version, quantized = "idle", False

    event = correction(1, 10, "Zorvex")
    with postgres_server() as url:
        s = replace(settings, home=tmp_path, database_url=url, webhook_secret="", label_studio_url="http://127.0.0.1:9")
        client = create_app(s, Idle()).test_client()
        assert client.post("/webhook", json=event).status_code == 201
    down = client.post("/webhook", json=correction(2, 20, "Kavoria"))
    assert down.status_code == 503 and down.headers["Retry-After"] and "retry" in down.get_json()["error"]
    assert '"id": 2' in (tmp_path / "webhooks" / "events.jsonl").read_text()  # kept in the audit log


@pytest.mark.distributed
def test_two_workers_never_run_the_same_job(postgres_url):
    from servers import fresh_database

    ledger = Ledger(fresh_database(postgres_url))

    def claim(job_id: int, worker: int, barrier: threading.Barrier, won: list[int]) -> None:
        barrier.wait()  # all 16 ask at the same moment
        if ledger.jobs.claim(job_id, f"worker-{worker}") is not None:
            won.append(worker)

    for round_ in range(5):
        job, created = ledger.jobs.request(7, "cli")
        assert created
        barrier, won = threading.Barrier(16), []
        threads = [threading.Thread(target=claim, args=(job.id, i, barrier, won)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, (round_, won)
        assert ledger.jobs.get(job.id).worker == f"worker-{won[0]}"
        ledger.jobs.finish(job.id, "rejected", reason="test")


@pytest.mark.distributed
def test_a_worker_killed_mid_job_is_requeued_then_runs_once(postgres_url, settings, tmp_path):
    from servers import fresh_database

    from loopscribe import jobs

    url = fresh_database(postgres_url)
    s = replace(settings, home=tmp_path, database_url=url, train_max_attempts=2)
    job, _ = Ledger(url).jobs.request(7, "cli")
    # a worker process claims the job, reports progress, and is killed (SIGKILL: no chance to clean up)
    worker = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from ml_backend.ledger import Ledger; ledger = Ledger(sys.argv[1]);"
        "ledger.jobs.claim(int(sys.argv[2]), f'{os.uname().nodename}:{os.getpid()}');"
        "ledger.jobs.progress(int(sys.argv[2]), stage='training', step=3, total_steps=40);"
        "print('claimed', flush=True); time.sleep(600)"), url, str(job.id)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert worker.stdout is not None and worker.stdout.readline().strip() == "claimed"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    requeued: list[int] = []
    assert jobs.recover_jobs(s, requeued.append) == [(job.id, "queued")] and requeued == [job.id]
    again = Ledger(url).jobs.get(job.id)
    assert again.state == "queued" and "stopped during step 3/40" in (again.reason or "")
    assert Ledger(url).jobs.claim(job.id, "next:1") is not None and Ledger(url).jobs.claim(job.id, "x:2") is None


@pytest.mark.distributed
def test_processes_opening_a_new_database_at_once_migrate_it_once(postgres_url):
    from servers import fresh_database

    url = fresh_database(postgres_url)
    opener = [sys.executable, "-c", "import sys; from ml_backend.ledger import Ledger; Ledger(sys.argv[1])", url]
    procs = [subprocess.Popen(opener, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(ROOT)}) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    with create_engine(database_url(url)).connect() as db:
        assert db.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
        tables = set(db.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert {"annotations", "jobs", "splits", "counters", "alembic_version"} <= tables
