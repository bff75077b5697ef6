"""LoRA training over several processes with ``accelerate launch`` (DDP), or in this process.

:func:`train` is what a training job calls. With one process it is :func:`training.lora.train_lora`.
With several it writes the examples and arguments to a work folder and runs
``accelerate launch --multi_gpu --num_processes N -m training.distributed FOLDER``: accelerate's
torchrun launcher, which on a machine without GPUs starts N CPU processes joined over gloo
(``DistributedType.MULTI_CPU``), and on a GPU machine one process per GPU over NCCL. Each process
runs the same :func:`~training.lora.train_lora` on its share of every batch; the main process saves
the adapter (the same peft format as one process) and writes ``result.json``. Progress comes
back as JSON lines on the main process's stdout. Several machines use accelerate's own
configuration (``accelerate config``: ``num_machines``, ``main_process_ip``…), read by the same
launcher.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from ml_backend.errors import LoopscribeError

from .dataset import Example
from .lora import LoraArguments, Progress, TrainResult, device_and_precision, train_lora

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "LOOPSCRIBE_PROGRESS "


def processes_for(setting: int, device_setting: str = "auto") -> int:
    """``TRAIN_PROCESSES``: a number, or 0 for one per GPU when this machine has several (else one)."""
    if setting > 0:
        return setting
    device, _ = device_and_precision(device_setting)
    return max(1, torch.cuda.device_count()) if device == "cuda" else 1


def train(base_path: str, examples: Sequence[Example], args: LoraArguments, out_dir: Path, *, processes: int = 1,
          on_step: Callable[[Progress], None] | None = None, progress: bool = True) -> TrainResult:
    """Train on ``processes`` data-parallel processes (1: here, in this process)."""
    if processes <= 1:
        return train_lora(base_path, examples, args, out_dir, on_step=on_step, progress=progress)
    with tempfile.TemporaryDirectory(prefix="ddp-", dir=Path(out_dir).parent) as work:
        spec = Path(work)
        with open(spec / "examples.pkl", "wb") as f:
            pickle.dump(list(examples), f, protocol=pickle.HIGHEST_PROTOCOL)
        (spec / "job.json").write_text(json.dumps({"base_path": base_path, "args": args.to_dict(),
                                                   "out_dir": str(out_dir)}))
        _, precision = device_and_precision(args.device, args.dtype)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
                   "-m", "training.distributed", str(spec)]
        log.info("training on %d processes: %s", processes, " ".join(command))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(_threads(processes)))  # accelerate's own default is 1 thread
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as child:
            assert child.stdout is not None
            for line in child.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    if on_step is not None:
                        on_step(Progress(**json.loads(line[len(PROGRESS_PREFIX):])))
                else:
                    sys.stdout.write(line)
            code = child.wait()
        result_path = spec / "result.json"
        if code != 0 or not result_path.is_file():
            raise LoopscribeError(f"distributed training ({processes} processes) failed with exit code {code}; "
                                  "its log is above")
        result = json.loads(result_path.read_text())
    result["adapter_dir"] = Path(result["adapter_dir"])
    return TrainResult(**result)


def _threads(processes: int) -> int:
    """CPU threads per process: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // processes)


def main(spec_dir: str) -> int:
    """One process of a launched run (``python -m training.distributed FOLDER``)."""
    spec = Path(spec_dir)
    job = json.loads((spec / "job.json").read_text())
    with open(spec / "examples.pkl", "rb") as f:
        examples = pickle.load(f)  # written by train() above, in a folder of its own

    def report(p: Progress) -> None:
        print(PROGRESS_PREFIX + json.dumps(asdict(p)), flush=True)

    from accelerate import PartialState

    result = train_lora(job["base_path"], examples, LoraArguments.from_dict(job["args"]), Path(job["out_dir"]),
                        on_step=report, progress=False)
    if PartialState().is_main_process:
        (spec / "result.json").write_text(json.dumps(asdict(result) | {"adapter_dir": str(result.adapter_dir)}))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1]))
