"""``loopscribe bench train``: seconds per LoRA training step and peak memory, per model.

It runs the product's own training function (:func:`training.lora.train_lora`) for a fixed
number of steps on clips with reference transcripts, on whatever device is there: CUDA
with bf16/fp16 and gradient checkpointing, else the CPU. Models are bundled names or local
Hugging Face directories. For a size whose weights are not at hand (no model hub here),
``--shape large-v3`` writes a randomly initialized Whisper with the published dimensions
to a local directory and trains on that: step time and memory are those of the real
model (they do not depend on the weight values), the loss is meaningless.

Two step times are reported. In the default decoder-only mode the frozen encoder runs
once per utterance, in the first epoch, and its output is reused, so the first epoch's
steps cost more than later ones; with ``--encoder`` every step runs the whole model, and with
``--encoder-layers N`` (repeatable: a row each, 0 = all) the top N encoder layers, the frozen
ones below them being cached like the encoder in decoder-only mode.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ml_backend.audio import WINDOW_SECONDS, decode_audio, duration
from ml_backend.settings import Settings

from .engine import reference_clips

# Published Whisper dimensions: (d_model, layers in encoder and in decoder, attention heads).
SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (384, 4, 6), "base": (512, 6, 8), "small": (768, 12, 12),
    "medium": (1024, 24, 16), "large-v2": (1280, 32, 20), "large-v3": (1280, 32, 20),
}


@dataclass
class TrainBenchRow:
    model: str
    parameters_m: float
    trainable_m: float
    device: str
    encoder: bool
    batch_size: int
    steps: int
    first_epoch_s_per_step: float
    later_s_per_step: float | None
    peak_memory_mb: float
    final_loss: float
    processes: int = 1
    encoder_layers: int = 0  # with encoder: the top N adapted, 0 = all


def shape_dimensions(shape: str, vocab_size: int = 51865) -> dict[str, int]:
    """``WhisperConfig`` fields of a published size; large-v3 has 128 mel bins and one more vocabulary row
    (the ``<|yue|>`` token) than the multilingual ``vocab_size`` of the others."""
    d_model, layers, heads = SHAPES[shape]
    return {"d_model": d_model, "encoder_layers": layers, "decoder_layers": layers,
            "encoder_attention_heads": heads, "decoder_attention_heads": heads, "encoder_ffn_dim": 4 * d_model,
            "decoder_ffn_dim": 4 * d_model, "num_mel_bins": 128 if shape == "large-v3" else 80,
            "vocab_size": vocab_size + (1 if shape == "large-v3" else 0)}


def random_whisper(shape: str, tokenizer_from: str, out_dir: Path) -> Path:
    """A randomly initialized Whisper of a published size, saved (fp16) with a working tokenizer.

    The tokenizer and feature extractor come from ``tokenizer_from`` (the bundled base);
    large-v3 gets its 128 mel bins and one more vocabulary row (the ``<|yue|>`` token).
    """
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    base = WhisperConfig.from_pretrained(tokenizer_from)
    dimensions = shape_dimensions(shape, base.vocab_size)
    mels = dimensions["num_mel_bins"]
    config = WhisperConfig.from_dict({**base.to_dict(), **dimensions,
                                      "num_hidden_layers": dimensions["encoder_layers"]})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = WhisperForConditionalGeneration(config)
    model.half().save_pretrained(out_dir)
    WhisperTokenizer.from_pretrained(tokenizer_from).save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=mels).save_pretrained(out_dir)  # Whisper's defaults, N mel bins
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def _examples(args: argparse.Namespace, settings: Settings, count: int):
    """``count`` training utterances, cycling through the reference clips of at most 30 s.

    Longer recordings are left out: their one reference text cannot be split with the audio,
    and Label Studio tasks (what the job trains on) are ≤ 30 s windows anyway.
    """
    from training.dataset import Example

    pool: list[tuple[np.ndarray, str, str]] = []
    for clip in reference_clips(args.clips, settings):
        audio = decode_audio(clip.path)
        if duration(audio) <= WINDOW_SECONDS:
            pool.append((audio, clip.text, clip.language))
    if not pool:
        raise SystemExit("no clips with reference transcripts (give --clips DIR with a transcripts.json)")
    return [Example(task=i, audio=pool[i % len(pool)][0], text=pool[i % len(pool)][1],
                    language=pool[i % len(pool)][2]) for i in range(count)]


def _peak_rss_mb(children: bool = False) -> float:
    """This process's peak RSS, or with ``children`` the largest of its finished children's (one trainer's)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_one(model_path: str, label: str, args: argparse.Namespace, settings: Settings, examples,
              processes: int = 1, encoder_layers: int | None = None) -> TrainBenchRow:
    """Train ``args.steps`` steps (rounded up to whole epochs) on ``processes`` processes and time each one."""
    from training import distributed
    from training.lora import LoraArguments

    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    encoder = args.encoder or encoder_layers is not None
    lora = LoraArguments.from_settings(settings, batch_size=args.batch_size, encoder=encoder,
                                       encoder_layers=encoder_layers or 0, max_steps=0,  # --steps decides
                                       epochs=max(1, math.ceil(args.steps / steps_per_epoch)))
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        result = distributed.train(model_path, examples, lora, Path(out) / "adapter", processes=processes,
                                   on_step=lambda progress: stamps.append(time.perf_counter()),
                                   progress=not args.quiet)
    durations = np.diff(stamps)  # step 1 also pays for loading the model: time from its end
    first_epoch, later = durations[: steps_per_epoch - 1], durations[steps_per_epoch - 1 :]
    return TrainBenchRow(
        model=label if not encoder_layers else f"{label}, top {encoder_layers} enc layers",
        parameters_m=(result.parameters - result.trainable_parameters) / 1e6,
        trainable_m=result.trainable_parameters / 1e6,
        device=torch.cuda.get_device_name() if result.device.startswith("cuda") else "cpu",
        encoder=encoder,
        encoder_layers=encoder_layers or 0,
        batch_size=args.batch_size,
        steps=result.steps,
        first_epoch_s_per_step=float(np.mean(first_epoch)) if first_epoch.size else float("nan"),
        later_s_per_step=float(statistics.median(later)) if later.size else None,
        peak_memory_mb=result.peak_memory_mb if result.peak_memory_mb is not None else _peak_rss_mb(processes > 1),
        final_loss=result.final_loss,
        processes=result.processes,
    )


def _fmt(row: TrainBenchRow, first: TrainBenchRow) -> str:
    later = f"{row.later_s_per_step:8.3f}" if row.later_s_per_step is not None else "       -"
    ratio = row.first_epoch_s_per_step / first.first_epoch_s_per_step
    model = row.model if row.processes == 1 else f"{row.model}, {row.processes} processes"
    return (f"{model:34s} {row.parameters_m:7.0f} {row.batch_size:5d} {row.steps:5d} "
            f"{row.first_epoch_s_per_step:10.3f} {later} {ratio:6.2f}x {row.peak_memory_mb:9.0f} {row.final_loss:6.2f}")


def bench_train(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.model_store import resolve_base

    args.batch_size = args.batch_size or settings.train_batch_size
    examples = _examples(args, settings, args.examples or 4 * args.batch_size)
    cuda = torch.cuda.is_available()
    mode = ("encoder+decoder LoRA" if args.encoder or args.encoder_layers else
            "decoder-only LoRA (encoder cached)")
    print(f"{len(examples)} utterances, {sum(e.duration for e in examples):.0f} s of audio; {mode}; device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}, batch {args.batch_size}, {args.steps} steps",
          flush=True)
    rows: list[TrainBenchRow] = []
    models = args.model or ([] if args.shape else [settings.whisper_model])
    with tempfile.TemporaryDirectory(prefix="bench-shapes-") as scratch:
        targets = [(resolve_base(settings, m, install_missing=True).path, m) for m in models]
        for shape in args.shape or []:
            # any multilingual Whisper's tokenizer fits: the first model given, else the bundled base
            tokenizer_from = targets[0][0] if targets else resolve_base(settings, "base", install_missing=True).path
            print(f"writing a randomly initialized Whisper {shape} to a local directory …", flush=True)
            written = random_whisper(shape, tokenizer_from, Path(scratch) / shape)
            targets.append((str(written), f"{shape} (random weights)"))
        for path, label in targets:
            if cuda:
                torch.cuda.empty_cache()
            for processes in args.processes or [1]:
                for top in args.encoder_layers or [None]:
                    rows.append(bench_one(path, label, args, settings, examples, processes, top))
                    print(_fmt(rows[-1], rows[0]), flush=True)
    print(f"\n{'model':34s} {'M par':>7s} {'batch':>5s} {'steps':>5s} {'ep1 s/step':>10s} {'later':>8s} "
          f"{'vs 1st':>7s} {'peak MB':>9s} {'loss':>6s}")
    for row in rows:
        print(_fmt(row, rows[0]))
    print("\nep1 s/step: first epoch (the encoder runs on each new utterance); later: median once cached. "
          f"peak MB: {'torch.cuda.max_memory_allocated' if cuda else 'process peak RSS (only grows)'}.")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0
