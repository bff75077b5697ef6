"""Which GPU a worker process uses (``WORKER_GPU``), decided once when the worker starts.

With ``WORKER_GPU=claim`` several workers on one machine (``docker compose up --scale worker=4``,
or several ``huey_consumer`` processes) spread over its GPUs without being told which: each
takes an exclusive ``flock`` on a slot file ``LOOPSCRIBE_HOME/run/gpus/<gpu>.<k>.lock``, trying
slot 0 of every GPU before slot 1 of any, so N workers on G GPUs hold them round-robin. The
kernel drops a lock when its process dies, however it dies, so a restarted worker finds its GPU
free again. The choice is written to ``CUDA_VISIBLE_DEVICES`` before anything initialises
CUDA, so the worker's engine and the training processes it launches see that GPU alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)
MAX_SLOTS = 64  # workers per GPU before claiming gives up (they then see every GPU)
_held: list[IO[str]] = []  # the claimed slot's open lock file: the lock lives as long as the process


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES entries: the variable's own list when it is set,
    else the UUIDs ``nvidia-smi`` reports (none without an NVIDIA driver). CUDA is not initialised."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def claim_gpu(lock_dir: Path, gpus: list[str]) -> tuple[str, IO[str]] | None:
    """An exclusive slot on the least-held GPU: ``(gpu, open lock file)``; None if every slot is taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        for gpu in gpus:
            handle = open(lock_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.{slot}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return gpu, handle
    return None


def pin_worker_gpu(setting: str, lock_dir: Path) -> str | None:
    """Apply ``WORKER_GPU`` to this process; returns the CUDA_VISIBLE_DEVICES it set (None: unchanged)."""
    if not setting:
        return None
    if setting != "claim":
        os.environ["CUDA_VISIBLE_DEVICES"] = setting
        return setting
    gpus = visible_gpus()
    if len(gpus) < 2:
        return None  # nothing to choose between
    claimed = claim_gpu(lock_dir, gpus)
    if claimed is None:
        log.warning("every GPU slot under %s is taken; this worker uses all %d GPUs", lock_dir, len(gpus))
        return None
    gpu, handle = claimed
    _held.append(handle)
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log.info("worker %d claimed GPU %s", os.getpid(), gpu)
    return gpu
