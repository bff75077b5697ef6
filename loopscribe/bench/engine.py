"""``loopscribe bench engine``: throughput of this engine against faster-whisper on the same clips.

Every engine decodes the same audio (already decoded to 16 kHz, so FFmpeg time is not
counted) greedily, with timestamps and Whisper's temperature fallback, in one process.
Figures are audio seconds per wall second and the ratio to faster-whisper int8; the
error rate (WER, CER for zh) shows what a faster variant costs in accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ml_backend.audio import decode_audio, duration
from ml_backend.settings import Settings

from ..demo import ReferenceClip, shared_clips
from .synth import espeak_clips


@dataclass
class BenchRow:
    engine: str
    batch_size: int
    audio_seconds: float
    wall_seconds: float
    error_rate: float
    peak_memory_mb: float | None = None  # GPU only: torch.cuda.max_memory_allocated

    @property
    def speed(self) -> float:
        return self.audio_seconds / self.wall_seconds


def reference_clips(folder: Path | None, settings: Settings) -> list[ReferenceClip]:
    """A folder's clips (with references when it has a ``transcripts.json`` like ``shared/audio``'s),
    else the shared real recordings plus espeak-ng sentences."""
    if folder:
        if (folder / "transcripts.json").is_file():
            return shared_clips(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".json")
        return [ReferenceClip(p, "", "") for p in files]
    return shared_clips() + espeak_clips(settings.home / "cache" / "espeak", per_language=2)


def _error_rate(clips: list[ReferenceClip], texts: list[str]) -> float:
    from training.metrics import corpus_error_rate

    scored = [(c, t) for c, t in zip(clips, texts) if c.text]
    if not scored:
        return float("nan")
    return corpus_error_rate([c.text for c, _ in scored], [t for _, t in scored], [c.language for c, _ in scored])


def _timed(run: Callable[[], list[str]], repeats: int) -> tuple[float, list[str]]:
    best, texts = float("inf"), []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        texts = run()
        best = min(best, time.perf_counter() - start)
    return best, texts


def bench_engine(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.engine import WhisperEngine
    from ml_backend.model_store import resolve_base
    from ml_backend.transcription import TranscribeOptions
    from ml_backend.whisper import pick_dtype

    if getattr(args, "shape", None):
        from .shapes import bench_attention, bench_shapes

        return bench_attention(args) if getattr(args, "attention_only", False) else bench_shapes(args)
    clips = reference_clips(args.clips, settings)
    audio = [decode_audio(c.path) for c in clips]
    total = sum(duration(a) for a in audio)
    cuda = torch.cuda.is_available()
    print(f"{len(clips)} clips, {total:.1f} s of audio; device {'cuda' if cuda else 'cpu'}, "
          f"{torch.get_num_threads()} threads", flush=True)
    models = [settings.whisper_model] + ([str(args.large_v3)] if args.large_v3 else [])
    rows: list[BenchRow] = []
    for model in models:
        resolved = resolve_base(settings, model, install_missing=True)
        ct2_path = resolved.ct2_path or str(Path(resolved.path).parent / "ct2")
        model_rows: list[BenchRow] = []

        # served options (word timings on), plus one row without word timings: what the regions cost
        served, no_words = TranscribeOptions(), TranscribeOptions(word_timestamps=False)
        variants: list[tuple[str, Settings, TranscribeOptions]]
        if cuda:
            variants = [(f"transformers {dtype}", replace(settings, dtype=dtype), served)
                        for dtype in ("float16", "bfloat16", "float32")]
            variants.append(("transformers bfloat16, no word timings", replace(settings, dtype="bfloat16"), no_words))
        else:  # what `up` serves (WHISPER_DTYPE=auto), without word timings, then the other CPU choices
            auto = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
            variants = [(f"transformers {auto} (auto)", replace(settings, dtype="auto"), served),
                        (f"transformers {auto} (auto), no word timings", replace(settings, dtype="auto"), no_words)]
            if auto != "float32":
                variants.append(("transformers float32", replace(settings, dtype="float32"), served))
            variants.append(("transformers int8-dynamic", replace(settings, quantize=True), served))
        for label, variant, options in variants:
            for batch in args.batch_size or [settings.batch_size]:
                engine = WhisperEngine(replace(variant, batch_size=batch), model)
                engine.transcribe(audio, options)  # warm-up: oneDNN builds its kernels for each new shape once
                engine.clear_cache()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

                def run(engine: WhisperEngine = engine, options: TranscribeOptions = options) -> list[str]:
                    engine.clear_cache()
                    return [r.text for r in engine.transcribe(audio, options)]

                wall, texts = _timed(run, args.repeats)
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
                model_rows.append(BenchRow(f"{resolved.name} loopscribe {label}", engine.decoder.slots, total, wall,
                                           _error_rate(clips, texts), peak))
                print(_fmt(model_rows[-1], None), flush=True)
                del engine
                if cuda:
                    torch.cuda.empty_cache()

        try:
            from faster_whisper import WhisperModel
        except ImportError:
            WhisperModel = None
            print("faster-whisper is not installed: no peer rows", flush=True)
        if WhisperModel is not None and Path(ct2_path, "model.bin").is_file():
            compute_types = ["float16"] if cuda else ["int8", "float32"]
            for compute_type in compute_types:
                try:
                    fw = WhisperModel(ct2_path, device="cuda" if cuda else "cpu", compute_type=compute_type,
                                      cpu_threads=torch.get_num_threads())
                except (RuntimeError, ValueError) as exc:  # e.g. a CTranslate2 build without this CUDA
                    print(f"faster-whisper {compute_type}: unavailable ({exc})", flush=True)
                    continue
                def fw_run(fw: WhisperModel = fw) -> list[str]:
                    return ["".join(s.text for s in fw.transcribe(a, beam_size=1, best_of=1)[0]).strip() for a in audio]

                fw_run()  # warm-up, as for this engine
                wall, texts = _timed(fw_run, args.repeats)
                model_rows.append(BenchRow(f"{resolved.name} faster-whisper {compute_type}", 1, total, wall,
                                           _error_rate(clips, texts)))
                print(_fmt(model_rows[-1], None), flush=True)
        rows += model_rows
        peer = next((r for r in model_rows if "faster-whisper" in r.engine), model_rows[0])
        print(f"\npeer: {peer.engine}, batch {peer.batch_size}")
        print(f"{'engine':52s} {'batch':>5s} {'audio s/wall s':>14s} {'vs peer':>7s} {'error':>6s} {'peak MB':>8s}")
        for row in model_rows:
            print(_fmt(row, peer))
        print()
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"speed": r.speed} for r in rows], indent=2))
    return 0


def _fmt(row: BenchRow, peer: BenchRow | None) -> str:
    ratio = f"{row.speed / peer.speed:6.2f}x" if peer else "      -"
    peak = f"{row.peak_memory_mb:8.0f}" if row.peak_memory_mb is not None else "       -"
    return f"{row.engine:52s} {row.batch_size:5d} {row.speed:14.2f} {ratio:>7s} {row.error_rate:6.3f} {peak}"
