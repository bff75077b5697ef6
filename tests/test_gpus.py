"""WORKER_GPU=claim: workers on one machine spread over its GPUs by lock files, without a GPU here.

The GPUs are names (what CUDA_VISIBLE_DEVICES would hold); nothing touches CUDA. The claim is an
``flock``, so these tests hold it from several open files and from a process that is then killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from loopscribe.gpus import claim_gpu, pin_worker_gpu, visible_gpus

ROOT = Path(__file__).resolve().parents[1]


def test_workers_take_the_gpus_round_robin(tmp_path):
    held = [claim_gpu(tmp_path, ["GPU-a", "GPU-b"]) for _ in range(5)]
    assert [h[0] for h in held if h] == ["GPU-a", "GPU-b", "GPU-a", "GPU-b", "GPU-a"]
    held[1][1].close()  # the worker on GPU-b slot 0 ends: the next one takes its place
    again = claim_gpu(tmp_path, ["GPU-a", "GPU-b"])
    assert again and again[0] == "GPU-b" and again[1].name.endswith("GPU-b.0.lock")


def test_a_killed_workers_gpu_is_free_again(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from loopscribe.gpus import claim_gpu;"
        "held = claim_gpu(Path(sys.argv[1]), ['0', '1']); print(held[0], flush=True); time.sleep(600)"),
        str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "0"
    assert claim_gpu(tmp_path, ["0", "1"])[0] == "1"  # GPU 0 is held by the other process
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert claim_gpu(tmp_path, ["0", "1"])[0] == "0"


def test_the_setting_pins_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    assert pin_worker_gpu("", tmp_path) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # default: all
    assert pin_worker_gpu("claim", tmp_path) == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert pin_worker_gpu("claim", tmp_path) == "3"  # slot 0 of GPU 2 is this process's first claim
    assert pin_worker_gpu("GPU-8f1c", tmp_path) == "GPU-8f1c" and os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-8f1c"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert pin_worker_gpu("claim", tmp_path) is None  # one GPU: nothing to choose
