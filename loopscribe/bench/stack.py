"""Benchmarks of the running stack (``loopscribe up``): ``bench backend``, ``bench retrain``, ``bench export``."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from ml_backend.settings import Settings

from ..paths import LABEL_CONFIG


def bench_backend(args: argparse.Namespace, settings: Settings) -> int:
    """/predict latency (10-task batches of ≤10 s clips) and bulk pre-annotation vs raw engine throughput.

    Needs the running stack (``loopscribe up``). Every repetition of every run uses
    different audio (inaudible noise at 40 dB SNR, a fresh seed), so no cache answers.
    """
    import requests

    from ml_backend.engine import WhisperEngine

    from .. import labelstudio, stack
    from ..demo import SENTENCES, load, sentence_clips, with_noise, write_wav

    ls = labelstudio.client(settings)
    media = stack.StackPaths(settings.home).media
    base = [c for c in sentence_clips(settings.home / "cache" / "espeak", list(SENTENCES), per_language=2)]
    base = (base * 2)[: args.tasks]
    # Fresh audio on every run: a running backend keeps earlier runs' clips in its cache.
    run_seed = int(time.time())
    out = media / f"bench-{run_seed}"
    paths = []
    for rep in range(args.repeats):
        for i, clip in enumerate(base):
            path = out / f"rep{rep:02d}_{i:02d}.wav"
            write_wav(with_noise(load(clip.path), snr_db=40.0, seed=run_seed + rep * 100 + i), path)
            paths.append(path)
    label_config = LABEL_CONFIG.read_text()
    project = labelstudio.create_project(ls, f"bench {time.strftime('%Y%m%d-%H%M%S')}", label_config)
    try:
        report = labelstudio.import_audio(ls, settings, project, paths, media_root=media, progress=False)
        tasks = sorted(ls.tasks.list(project=project, fields="all"), key=lambda t: t.data["source_file"])
        by_rep = [tasks[r * args.tasks : (r + 1) * args.tasks] for r in range(args.repeats)]
        auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
        latencies = []
        for rep_tasks in by_rep:
            body = {"tasks": [t.model_dump(mode="json") for t in rep_tasks], "label_config": label_config}
            start = time.perf_counter()
            r = requests.post(f"{settings.backend_url}/predict", json=body, auth=auth, timeout=600)
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()
            assert all(item["result"] for item in r.json()["results"]), "a bench task got no prediction"
        audio_per_batch = sum(float(t.data["duration"]) for t in by_rep[0])
        lat = np.array(latencies)
        print(f"/predict, {args.tasks} tasks of ≤10 s ({audio_per_batch:.1f} s audio) per request, "
              f"{args.repeats} requests: p50 {np.percentile(lat, 50):.2f} s, p95 {np.percentile(lat, 95):.2f} s, "
              f"max {lat.max():.2f} s")

        engine = WhisperEngine(settings)
        engine.transcribe([load(paths[0])])  # warm-up
        engine.clear_cache()
        start = time.perf_counter()
        bulk = labelstudio.predict_project(ls, settings, project, engine, only_missing=False, progress=False)
        bulk_wall = time.perf_counter() - start
        engine.clear_cache()
        clips = [load(p) for p in paths]
        start = time.perf_counter()
        engine.transcribe(clips)
        raw_wall = time.perf_counter() - start
        audio = sum(c.size for c in clips) / 16000
        print(f"bulk pre-annotation: {bulk.predicted} tasks, {audio:.0f} s audio: {audio / bulk_wall:.2f} audio s/s; "
              f"raw engine on the same clips: {audio / raw_wall:.2f} audio s/s; ratio {raw_wall / bulk_wall:.2f}")
        assert report.tasks_created == len(paths)
    finally:
        if not args.keep:
            ls.projects.delete(id=project)
            shutil.rmtree(out, ignore_errors=True)
    return 0


def bench_retrain(args: argparse.Namespace, settings: Settings) -> int:
    """Time from a queued training job to a promoted (or rejected) model, for N corrections.

    Needs the running stack (``loopscribe up``): a scratch project gets N + 20 made-up-vocabulary
    clips, N of them are annotated with the true transcript through Label Studio's API, and
    one training job is queued; the worker runs it. Stage times come from the ledger. By
    default the project is deleted afterwards (its promotion touched only its own lineage).
    """
    from ml_backend.engine import WhisperEngine
    from ml_backend.ledger import Ledger
    from ml_backend.registry import Registry

    from .. import jobs, labelstudio, stack
    from .synth import vocabulary_clips

    ls = labelstudio.client(settings)
    clips = vocabulary_clips(settings.home / "cache" / "vocab", args.corrections + 20)
    truth = {c.path.name: c.text for c in clips}
    label_config = LABEL_CONFIG.read_text()
    project = labelstudio.create_project(ls, f"bench retrain {time.strftime('%Y%m%d-%H%M%S')}", label_config)
    ledger = Ledger(settings.ledger_url)
    try:
        labelstudio.import_audio(ls, settings, project, [c.path for c in clips],
                                 media_root=stack.StackPaths(settings.home).media, progress=False)
        labelstudio.predict_project(ls, settings, project, WhisperEngine(settings, project=project), progress=False)
        tasks = sorted(ls.tasks.list(project=project, fields="all"), key=lambda t: t.data["source_file"])
        for task in tasks[: args.corrections]:
            labelstudio.submit_transcript(ls, task, truth[Path(task.data["source_file"]).name], "en")
        job, _ = jobs.request_training(settings, project, "bench", {"epochs": args.epochs} if args.epochs else None)
        print(f"project {project}: {args.corrections} annotated tasks, training job {job.id} queued", flush=True)
        start, stage = time.time(), None
        marks: list[tuple[str | None, float]] = []
        while True:
            j = ledger.jobs.require(job.id)
            if j.stage != stage:
                stage = j.stage
                marks.append((stage, time.time() - start))
                print(f"{time.time() - start:7.1f} s  {stage}", flush=True)
            if j.state not in ("queued", "running"):
                break
            time.sleep(1)
        total = (j.finished_at or time.time()) - j.created_at
        print(f"\njob {j.id}: {j.state} in {total:.0f} s (queued → finished); {j.reason}")
        for (name, at), (_, nxt) in zip(marks, marks[1:] + [("end", time.time() - start)]):
            print(f"  {name or 'queued':24s} {nxt - at:7.1f} s")
        if j.version:
            v = Registry.open(settings).get(j.version)
            print(f"  train {v.train_size}, held-out {v.heldout_size}, "
                  f"error {v.error_before:.3f} → {v.error_after:.3f}, "
                  f"{v.params['steps']} steps in {v.params['train_seconds']} s on {v.params['device']}"
                  + (f", peak {v.params['peak_memory_mb']:.0f} MiB" if v.params.get("peak_memory_mb") else ""))
    finally:  # a promotion went into this project's own lineage: no other project's model changed
        if not args.keep:
            ls.projects.delete(id=project)
    return 0


def bench_export(args: argparse.Namespace, settings: Settings) -> int:
    """Time ``loopscribe export`` on a generated project of N annotated tasks (needs ``loopscribe up``).

    Clips are espeak-ng sentences in four languages, each task its own noisy variant (a fresh
    noise seed: distinct audio, as a real project has), imported in bulk with an annotation and
    a prediction each. Every format is exported in turn; the first export also fetches and
    decodes the audio into the cache, so later formats show the warm-cache cost.
    """
    from ml_backend.label_config import parse_label_config
    from training.export import ExportOptions, export_project

    from .. import labelstudio, stack
    from ..demo import SENTENCES, load, speak, with_noise, write_wav

    ls = labelstudio.client(settings)
    label_config = LABEL_CONFIG.read_text()
    config = parse_label_config(label_config)
    project = labelstudio.create_project(ls, f"bench export {time.strftime('%Y%m%d-%H%M%S')}", label_config)
    media = stack.StackPaths(settings.home).media
    clip_dir = media / f"project-{project}"
    out_root = Path(args.out or settings.home / "cache" / f"bench-export-{project}")
    try:
        labelstudio.ensure_local_storage(ls, project, clip_dir)
        voices = [(lang, text) for lang, texts in SENTENCES.items() for text in texts]
        base = {}
        for i, (lang, text) in enumerate(voices):
            base[i] = (lang, text, load(speak(text, lang, settings.home / "cache" / "bench-export" / f"{i}.wav")))
        start = time.perf_counter()
        tasks = []
        for n in range(args.tasks):
            lang, text, audio = base[n % len(base)]
            path = write_wav(with_noise(audio, snr_db=25, seed=n), clip_dir / f"clip-{n:05d}.wav")
            result = [
                {"from_name": config.transcript_name, "to_name": config.audio_name, "type": "textarea",
                 "value": {"text": [text]}},
                {"from_name": config.language_name, "to_name": config.audio_name, "type": "choices",
                 "value": {"choices": [config.language_values[lang]]}},
            ]
            tasks.append({
                "data": {"audio": f"/data/local-files/?d={path.relative_to(media)}", "source_file": str(path),
                         "source_offset": 0.0, "duration": round(audio.size / 16_000, 3)},
                "annotations": [{"result": result}],
                "predictions": [{"result": result, "score": 0.5, "model_version": "bench"}],
            })
        for i in range(0, len(tasks), 250):
            ls.projects.import_tasks(id=project, request=tasks[i : i + 250])  # type: ignore[arg-type]  # dicts
        print(f"project {project}: {len(tasks)} annotated tasks generated and imported in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        print(f"{'format':7s} {'tasks':>6s} {'audio min':>9s} {'seconds':>8s} {'tasks/s':>8s}")
        for fmt in args.format or ["hf", "nemo", "jsonl", "srt"]:
            t0 = time.perf_counter()
            report = export_project(settings, ls, project, out_root / fmt, ExportOptions(format=fmt, overwrite=True),
                                    progress=not args.quiet)
            seconds = time.perf_counter() - t0
            print(f"{fmt:7s} {report.exported:6d} {report.audio_seconds / 60:9.1f} {seconds:8.1f} "
                  f"{report.exported / seconds:8.1f}" + (f"  ({len(report.failed)} failed)" if report.failed else ""),
                  flush=True)
    finally:
        if not args.keep:
            task_ids = [t.id for t in ls.tasks.list(project=project, fields="task_only")]
            ls.projects.delete(id=project)
            shutil.rmtree(clip_dir, ignore_errors=True)
            shutil.rmtree(out_root, ignore_errors=True)
            for task in task_ids:  # the export's audio cache entries
                for f in (settings.home / "cache" / "audio").glob(f"{task}-*.npy"):
                    f.unlink(missing_ok=True)
    return 0
