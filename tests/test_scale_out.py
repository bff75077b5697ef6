"""Scale-out with the real servers: two workers on one Redis queue, the ledger in PostgreSQL.

A real Label Studio, the ML backend and two huey workers (separate processes, each with its
own Whisper) share a Redis queue and a PostgreSQL ledger, both started on loopback by the tests
(``tests/servers.py``). ``loopscribe predict --queue`` splits a project into shards; the test
checks that both workers take shards, that a worker killed mid-shard loses nothing once the
run is resumed, and that no task is pre-annotated twice by one run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest

from loopscribe import labelstudio, stack
from loopscribe.demo import demo_clips
from loopscribe.gpus import claim_gpu
from ml_backend.ledger import Ledger

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
CONFIG = (labelstudio.Path(__file__).resolve().parents[1] / "label_config.xml").read_text()


@pytest.fixture(scope="module")
def cluster(settings, engine, tmp_path_factory, launch_stack, postgres_url):
    """(settings, paths, env for the CLI, pid of the second worker) of a stack on PostgreSQL + Redis."""
    from servers import fresh_database, redis_server

    with redis_server() as redis_url:
        # WORKER_GPU=claim over two GPU names: the workers must take one each (CUDA itself is not touched)
        env = {"DATABASE_URL": fresh_database(postgres_url), "REDIS_URL": redis_url, "WORKER_GPU": "claim",
               "CUDA_VISIBLE_DEVICES": "0,1"}
        with launch_stack(settings, tmp_path_factory, env) as (s, paths, env_file):
            s = replace(s, database_url=env["DATABASE_URL"], redis_url=redis_url)
            second = stack.start_worker(stack.ensure_env_file(env_file), s, paths, name="worker-2")
            cli_env = env | {"LOOPSCRIBE_ENV_FILE": str(env_file), "LOOPSCRIBE_HOME": str(s.home),
                             "PATH": "/usr/bin:/bin"}
            try:
                yield s, paths, cli_env, second
            finally:
                stack.stop(paths, ("worker-2",))


@pytest.fixture(scope="module")
def project(cluster, shared_audio):
    s, paths, _, _ = cluster
    ls = labelstudio.client(s)
    project = labelstudio.find_or_create_project(ls, "sharded", CONFIG)
    clips = [c.path for c in demo_clips(s.home / "demo")][:10]
    clips += [shared_audio / n for n in ("jfk_en.flac", "one_two_three_en.wav")]
    report = labelstudio.import_audio(ls, s, project, clips, media_root=paths.media, progress=False)
    assert report.tasks_created == len(clips) and not report.failed
    return project


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopscribe.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def predictions_per_task(s, project: int, version: str) -> dict[int, int]:
    tasks: list = list(labelstudio.client(s).tasks.list(project=project, fields="all"))
    return {t.id: sum(p.model_version == version for p in (t.predictions or []))
            for t in tasks}


def test_the_workers_claim_one_gpu_each(cluster):
    s, paths, _, second = cluster
    locks, deadline = paths.run / "gpus", time.monotonic() + 120
    while len(list(locks.glob("*.lock"))) < 2 and time.monotonic() < deadline:  # a worker claims as it starts
        time.sleep(0.5)
    holders = {f.name: int(f.read_text()) for f in locks.glob("*.lock")}
    assert holders == {"0.0.lock": holders["0.0.lock"], "1.0.lock": holders["1.0.lock"]}
    assert set(holders.values()) == {stack.running_pid(paths, "worker"), second}
    third = claim_gpu(locks, ["0", "1"])  # both first slots are held: a third worker doubles up on GPU 0
    assert third is not None and third[1].name.endswith("0.1.lock")
    third[1].close()


def test_two_workers_share_the_shards_of_one_run(cluster, project, engine):
    s, _, env, second = cluster
    done = cli(env, "predict", "--project", str(project), "--queue", "--shard-size", "2", "--wait", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "queued pre-annotation run" in done.stdout and "6/6 shards done" in done.stdout
    assert s.label_studio_api_key not in done.stdout + done.stderr
    run = Ledger(s.ledger_url).prediction_runs.latest(project)
    assert run is not None and (run.tasks, run.predicted, run.failed) == (12, 12, 0)
    assert len(run.workers) == 2 and any(w.endswith(f":{second}") for w in run.workers), run.workers
    assert set(predictions_per_task(s, project, engine.model_version).values()) == {1}
    assert labelstudio.client(s).projects.get(id=project).model_version == engine.model_version

    again = cli(env, "predict", "--project", str(project), "--queue", "--shard-size", "4", "--wait", "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = Ledger(s.ledger_url).prediction_runs.latest(project)
    assert rerun.run != run.run and (rerun.predicted, rerun.skipped) == (0, 12)  # idempotent
    status = cli(env, "status", "--json", timeout=120)
    assert status.returncode == 0, status.stderr
    shown = next(p for p in json.loads(status.stdout)["projects"] if p["id"] == project)["pre_annotation"]
    assert shown["run"] == rerun.run and shown["finished_at"] and "12/12 tasks" in shown["summary"]


def test_a_worker_killed_mid_shard_loses_nothing_when_the_run_is_resumed(cluster, project, engine):
    s, paths, env, second = cluster
    queued = cli(env, "predict", "--project", str(project), "--queue", "--all", "--shard-size", "2")
    assert queued.returncode == 0, queued.stdout + queued.stderr
    store = Ledger(s.ledger_url).prediction_runs
    run = store.latest(project).run
    def held_by_second():
        return next((x for x in store.list(("running",), run=run) if (x.worker or "").endswith(f":{second}")), None)

    deadline, victim = time.monotonic() + 300, None
    while victim is None and time.monotonic() < deadline:
        if held_by_second() is not None:
            os.killpg(second, signal.SIGSTOP)  # frozen, it cannot finish the shard between this look and the kill
            victim = held_by_second()
            if victim is None:  # it finished that one just before: let it take another
                os.killpg(second, signal.SIGCONT)
        time.sleep(0.05)
    assert victim is not None, "the second worker never took a shard"
    os.killpg(second, signal.SIGKILL)  # mid-shard: no chance to report
    while stack.process_alive(second):
        time.sleep(0.1)
    resumed = cli(env, "predict", "--project", str(project), "--queue", "--all", "--wait", "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed pre-annotation run {run}" in resumed.stdout
    progress = store.progress(run)
    assert progress.states == {"done": 6} and progress.tasks_finished == 12
    assert store.get(run, victim.shard).attempts == 2
    # every task re-predicted once by this run (--all), none twice, although a worker died holding a shard
    counts = Counter(predictions_per_task(s, project, engine.model_version).values())
    assert counts == {2: 12}, counts
