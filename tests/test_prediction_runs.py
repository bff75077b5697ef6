"""Queued bulk pre-annotation: runs split into shards that any worker claims exactly once.

The store tests run on SQLite and, marked ``distributed``, on a real PostgreSQL started on loopback.
The workers themselves (two huey consumers on one Redis queue, a real Label Studio) are in
``tests/test_scale_out.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from ml_backend.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.distributed)])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    from servers import fresh_database

    return fresh_database(request.getfixturevalue("postgres_url"))


def test_a_run_is_split_into_shards_and_asking_again_resumes_it(database):
    store = Ledger(database).prediction_runs
    run, created = store.start(7, range(100, 110), shard_size=4)
    assert created
    shards = store.list(("queued",), run=run)
    assert [s.task_ids for s in shards] == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109]]
    assert all(s.project == 7 and s.only_missing for s in shards)
    assert store.start(7, range(100, 200), shard_size=4) == (run, False)  # unfinished: the same run
    other, created = store.start(8, [1], shard_size=4)  # another project has its own
    assert created and other != run
    progress = store.progress(run)
    assert progress and (progress.tasks, progress.shards, progress.states) == (10, 3, {"queued": 3})
    assert progress.finished_at is None


def test_the_run_ends_with_its_last_shard_and_the_next_one_is_new(database):
    store = Ledger(database).prediction_runs
    run, _ = store.start(7, range(5), shard_size=2)
    for n, shard in enumerate(store.list(("queued",), run=run)):
        claimed = store.claim(run, shard.shard, f"host:{n}")
        assert claimed is not None and store.progress(run).finished_at is None
        assert store.finish(claimed, "done", predicted=len(shard.task_ids) - 1, skipped=1, version="v1")
    progress = store.progress(run)
    assert progress.finished_at is not None and progress.states == {"done": 3}
    assert (progress.predicted, progress.skipped, progress.tasks_finished) == (2, 3, 5)
    assert progress.workers == ["host:0", "host:1", "host:2"]
    assert "3/3 shards done" in progress.summary() and "5/5 tasks" in progress.summary()
    again, created = store.start(7, range(5), shard_size=2)
    assert created and again != run and store.latest(7).run == again


def test_an_empty_project_gives_a_finished_run(database):
    store = Ledger(database).prediction_runs
    run, created = store.start(7, [], shard_size=64)
    assert created and store.progress(run).finished_at is not None and store.progress(run).shards == 0


def test_sixteen_workers_racing_for_each_shard_claim_it_once(database):
    store = Ledger(database).prediction_runs
    run, _ = store.start(7, range(12), shard_size=3)
    winners: dict[int, list[int]] = {n: [] for n in range(4)}

    def claim(shard: int, worker: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        if store.claim(run, shard, f"w:{worker}") is not None:
            winners[shard].append(worker)

    for shard in range(4):
        barrier = threading.Barrier(16)
        threads = [threading.Thread(target=claim, args=(shard, w, barrier)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(len(w) == 1 for w in winners.values()), winners
    assert {s.shard: s.worker for s in store.list(("running",), run=run)} == {
        n: f"w:{w[0]}" for n, w in winners.items()}


def test_a_dead_workers_shard_is_requeued_until_its_attempts_run_out(database):
    store = Ledger(database).prediction_runs
    run, _ = store.start(7, range(4), shard_size=2)
    for attempt in (1, 2):
        assert store.claim(run, 0, "gone:1").attempts == attempt
        assert store.requeue_or_fail(run, 0, "worker gone:1 stopped", max_attempts=3) == "queued"
    assert store.finish(store.claim(run, 1, "w:2"), "done", predicted=2)
    assert store.claim(run, 0, "gone:1").attempts == 3
    assert store.requeue_or_fail(run, 0, "worker gone:1 stopped", max_attempts=3) == "failed"
    assert store.requeue_or_fail(run, 0, "again", max_attempts=3) == "failed"  # no longer running: untouched
    progress = store.progress(run)
    assert progress.finished_at is not None and progress.states == {"done": 1, "failed": 1}
    assert progress.reasons == ["shard 0: worker gone:1 stopped"]


def test_a_silent_worker_whose_shard_was_taken_over_writes_nothing(database):
    store = Ledger(database).prediction_runs
    run, _ = store.start(7, range(2), shard_size=2)
    stale = store.claim(run, 0, "slow:1")
    assert store.heartbeat(stale)
    assert store.requeue_or_fail(run, 0, "silent for 15 min", max_attempts=3) == "queued"
    fresh = store.claim(run, 0, "slow:1")  # the same process may take it again (another huey thread)
    assert not store.heartbeat(stale) and not store.finish(stale, "done", predicted=99)
    assert store.progress(run).states == {"running": 1}
    assert store.heartbeat(fresh) and store.finish(fresh, "done", predicted=2)
    assert (store.progress(run).states, store.progress(run).predicted) == ({"done": 1}, 2)


@pytest.mark.distributed
def test_a_worker_killed_mid_shard_is_requeued_and_resent(postgres_url, settings, tmp_path):
    """SIGKILL a process holding a shard on PostgreSQL: the recovery every worker runs requeues and re-sends it."""
    from servers import fresh_database

    from loopscribe import jobs

    url = fresh_database(postgres_url)
    s = replace(settings, home=tmp_path, database_url=url)
    run, _ = Ledger(url).prediction_runs.start(7, range(6), shard_size=3)
    worker = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from ml_backend.ledger import Ledger; store = Ledger(sys.argv[1]).prediction_runs;"
        "store.claim(int(sys.argv[2]), 1, f'{os.uname().nodename}:{os.getpid()}');"
        "print('claimed', flush=True); time.sleep(600)"), url, str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert worker.stdout is not None and worker.stdout.readline().strip() == "claimed"
    assert jobs.recover_shards(s, enqueue=lambda *_: None) == []  # alive: left alone
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    sent: list[tuple[int, int]] = []
    assert jobs.recover_shards(s, enqueue=lambda r, n: sent.append((r, n))) == [(run, 1, "queued")]
    assert sent == [(run, 1)]
    shard = Ledger(url).prediction_runs.get(run, 1)
    assert shard.state == "queued" and f":{worker.pid} stopped" in (shard.reason or "")
    sent.clear()
    jobs.recover_shards(s, enqueue=lambda r, n: sent.append((r, n)), on_start=True)  # a worker starting
    assert sent == [(run, 0), (run, 1)]


def test_a_queued_run_decides_the_ahead_cutoff_once_and_every_shard_scores_with_it(settings, tmp_path,
                                                                                   monkeypatch):
    """Where the count decides, the cutoff needs the project's task ids: the run lists them when it is planned
    and keeps the cutoff, so its shards neither list the project again nor disagree when tasks arrive meanwhile."""
    from loopscribe import jobs, labelstudio
    from ml_backend.splits import ahead_cutoff

    s = replace(settings, home=tmp_path, database_url=str(tmp_path / "ledger.db"), heldout_fraction=0.2,
                heldout_ahead=0.05, heldout_ahead_tasks=30)
    task_ids = list(range(1000, 1240))  # 240 tasks: under 600, the count decides
    listings: list[int] = []

    def listing(ls, project: int) -> list[int]:
        listings.append(project)
        return task_ids

    monkeypatch.setattr(labelstudio, "client", lambda _settings: None)
    monkeypatch.setattr(labelstudio, "project_task_ids", listing)
    monkeypatch.setattr(jobs, "enqueue_prediction_shard", lambda *_: None)
    run, created, sent = jobs.queue_prediction_run(s, 7, shard_size=64)
    assert created and sent == 4 and listings == [7]
    expected = ahead_cutoff(7, len(task_ids), lambda: task_ids, 0.2, 0.05, 30)
    assert expected > 0.05  # the count's cutoff, not the share
    shards = Ledger(s.ledger_url).prediction_runs.list(("queued",), run=run)
    assert [x.ahead for x in shards] == [expected] * 4
    assert jobs.queue_prediction_run(s, 7) == (run, False, 4) and listings == [7]  # resumed: not listed again


def test_a_run_from_before_runs_kept_their_cutoff_leaves_it_to_the_shard(database):
    from sqlalchemy import update

    from ml_backend.schema import prediction_runs_table

    ledger = Ledger(database)
    run, _ = ledger.prediction_runs.start(7, range(3), shard_size=2, ahead=0.0125)
    assert [x.ahead for x in ledger.prediction_runs.list(("queued",), run=run)] == [0.0125, 0.0125]
    with ledger.prediction_runs.db.transaction() as db:  # what runs made before held: no cutoff in their options
        db.execute(update(prediction_runs_table).where(prediction_runs_table.c.id == run)
                   .values(options='{"only_missing": true, "only_unlabeled": false}'))
    assert [x.ahead for x in ledger.prediction_runs.list(("queued",), run=run)] == [None, None]
