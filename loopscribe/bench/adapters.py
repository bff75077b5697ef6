"""``loopscribe bench adapters``: memory and throughput with several projects' models live at once.

Each project has its own LoRA adapter over one shared base. Two ways to serve them side by side,
both the product's own (``SERVE_ADAPTERS``):

- ``merged``: one model per live version with its adapter merged in (``merge_and_unload``), kept in
  a small LRU pool. Decoding costs what the base costs; every live version costs a full model.
- ``shared``: one base with every adapter loaded beside it through peft and switched per batch
  (:meth:`~ml_backend.engine.WhisperEngine.with_adapter`). Every live version costs only its
  adapter; every decoding step pays the unmerged LoRA matmuls.

Each configuration (strategy × number of live adapters) runs in a fresh process, so its resident
and peak memory are its own. The adapters are LoRA deltas with the training recipe's shape
(``LORA_R``, target modules, decoder-only unless ``LORA_ENCODER``), random and small so decoding
behaves like the base. Requests come round-robin from the projects: a fixed number of batches,
each from the next adapter, each batch the same real clips (no transcription cache), so the
wall time compares like with like. Both strategies must give the same text for the same adapter;
the table says how many texts agree.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ml_backend.settings import Settings
from ml_backend.transcription import Transcriber

from ..demo import ReferenceClip, shared_clips

STRATEGIES = ("merged", "shared")


@dataclass
class AdapterRow:
    strategy: str
    adapters: int
    load_seconds: float  # loading every live adapter's model (merged) or the base + adapters (shared)
    resident_mb: float  # process memory after loading, before decoding
    peak_mb: float  # process high-water mark, decoding included
    audio_seconds: float
    wall_seconds: float
    texts: list[list[str]]  # per adapter: its transcripts of the clips

    @property
    def speed(self) -> float:
        return self.audio_seconds / self.wall_seconds


def _memory_mb() -> tuple[float, float]:
    """(resident, peak resident) of this process in MiB, from /proc (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def make_adapters(settings: Settings, count: int, out: Path, scale: float = 1e-3) -> list[Path]:
    """``count`` peft adapters over the base, shaped as training makes them, with small random deltas."""
    import torch
    from peft import get_peft_model

    from ml_backend.model_store import resolve_base
    from ml_backend.whisper import load_whisper, quiet_peft
    from training.lora import LoraArguments, lora_config

    base = resolve_base(settings, install_missing=True)
    with quiet_peft():
        whisper = load_whisper(base.path).model
        config = lora_config(LoraArguments.from_settings(settings), whisper.config.encoder_layers)
        model = get_peft_model(whisper, config)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        path = out / f"adapter-{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def _measure(strategy: str, settings: Settings, adapters: list[str], clip_paths: list[str],
             batches: int) -> dict:
    """One configuration, in its own process: load, decode ``batches`` batches round-robin, report."""
    import torch

    from ml_backend.audio import decode_audio, duration
    from ml_backend.engine import WhisperEngine
    from ml_backend.model_store import resolve_base
    from ml_backend.transcription import TranscribeOptions

    torch.manual_seed(0)
    clips = [decode_audio(p) for p in clip_paths]
    base = resolve_base(settings)
    engine = WhisperEngine(settings, resolved=base)  # loads transformers etc. before the baseline reading
    del engine
    resident_before, _ = _memory_mb()
    started = time.perf_counter()
    versions = [f"{base.version}-adapter{i}" for i in range(len(adapters))]
    engines: list[Transcriber]
    if strategy == "merged":
        engines = [WhisperEngine(settings, resolved=replace(base, version=v, adapter=a, base_version=base.version))
                   for v, a in zip(versions, adapters)]
    else:
        shared = WhisperEngine(settings, resolved=base)
        engines = [shared.with_adapter(v, a) for v, a in zip(versions, adapters)]

    def transcribe(i: int) -> list[str]:
        return [t.text for t in engines[i].transcribe(clips, TranscribeOptions())]
    load_seconds = time.perf_counter() - started
    resident, _ = _memory_mb()
    transcribe(0)  # warm-up (first-call allocations), not timed
    texts: dict[int, list[str]] = {}
    started = time.perf_counter()
    for b in range(batches):
        texts[b % len(adapters)] = transcribe(b % len(adapters))
    wall = time.perf_counter() - started
    _, peak = _memory_mb()
    return asdict(AdapterRow(strategy, len(adapters), load_seconds, resident - resident_before,
                             peak - resident_before, batches * sum(duration(c) for c in clips), wall,
                             [texts[i] for i in sorted(texts)]))


def bench_adapters(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.model_store import resolve_base

    counts = sorted({int(n) for n in args.adapters.split(",")})
    settings = replace(settings, cache_size=0)  # every batch decoded, never answered from the cache
    from ml_backend.audio import decode_audio, duration

    # utterance-length real clips, as Label Studio tasks are (the 60 s two-language file is left out)
    clips: list[ReferenceClip] = [c for c in shared_clips() if duration(decode_audio(c.path)) <= 30][: args.clips]
    base = resolve_base(settings, install_missing=True)
    print(f"{base.version} on {settings.device}, quantize={settings.quantize}; {len(clips)} real clips per batch, "
          f"{args.batches} batches round-robin over the live adapters; each configuration in a fresh process")
    rows: list[AdapterRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        adapters = [str(p) for p in make_adapters(settings, max(counts), Path(tmp))]
        context = multiprocessing.get_context("spawn")
        for n in counts:
            for strategy in STRATEGIES:
                with ProcessPoolExecutor(1, mp_context=context) as pool:
                    row = AdapterRow(**pool.submit(_measure, strategy, settings, adapters[:n],
                                                   [str(c.path) for c in clips], args.batches).result())
                rows.append(row)
                print(f"  {strategy:6s} {n:3d} live: load {row.load_seconds:6.1f} s, +{row.resident_mb:7.0f} MiB "
                      f"resident, peak +{row.peak_mb:7.0f} MiB, {row.speed:6.1f}x real time", flush=True)
    print(f"\n{'live':>4s} {'strategy':8s} {'load s':>7s} {'MiB':>7s} {'peak MiB':>9s} {'x real time':>11s} "
          f"{'vs merged':>9s} {'texts = merged':>14s}")
    for n in counts:
        merged = next(r for r in rows if r.adapters == n and r.strategy == "merged")
        for r in (r for r in rows if r.adapters == n):
            same = sum(a == b for x, y in zip(r.texts, merged.texts) for a, b in zip(x, y))
            total = sum(len(x) for x in merged.texts)
            print(f"{n:4d} {r.strategy:8s} {r.load_seconds:7.1f} {r.resident_mb:7.0f} {r.peak_mb:9.0f} "
                  f"{r.speed:11.1f} {r.speed / merged.speed:9.2f} {same:>8d}/{total}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"speed": r.speed} for r in rows], indent=2))
    return 0
