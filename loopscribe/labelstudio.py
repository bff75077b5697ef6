"""Label Studio operations: projects, audio import (split at pauses), bulk pre-annotation.

Bulk pre-annotation runs in this process, not through Label Studio's ``/predict``
(100 s timeout): tasks are fetched from Label Studio, transcribed in batches through
the engine, and pushed with ``projects.import_predictions``; then the project's
``model_version`` and "Uncertainty sampling" are set so ``/next`` serves the least
confident task first. Re-running skips tasks that already hold a prediction of the
live version.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import requests
from label_studio_sdk import LabelStudio
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    content_hash,
    decode_audio,
    split_at_pauses,
)
from ml_backend.errors import ConfigurationError, EnvironmentProblem
from ml_backend.fetch import AudioFetcher, AudioFetchError, load_task_audio
from ml_backend.label_config import parse_label_config
from ml_backend.predictions import to_prediction
from ml_backend.settings import Settings
from ml_backend.splits import ahead_cutoff, serving_score
from ml_backend.transcription import TranscribeOptions, Transcriber

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = {".wav", ".mp3", ".m4a", ".flac", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".webm", ".mp4"}
UNCERTAINTY_SAMPLING = "Uncertainty sampling"


def client(settings: Settings) -> LabelStudio:
    if not settings.label_studio_api_key:
        raise ConfigurationError("LABEL_STUDIO_API_KEY is not set (./scripts/up writes it to .env)")
    return LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key)


def check_token(ls: LabelStudio, data_dir: Path, env_file: Path) -> None:
    """Fail with what to do when Label Studio refuses the API key: its data folder was set up by another ``.env``
    (e.g. a second checkout on a machine that already ran ``up``, both under the same ``LOOPSCRIBE_HOME``)."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        ls.users.whoami()
    except ApiError as exc:
        if exc.status_code != 401:
            raise
        raise EnvironmentProblem(
            f"Label Studio refuses LABEL_STUDIO_API_KEY from {env_file}: its data in {data_dir} was set up with "
            "another key (another checkout's .env?). Use that .env (LOOPSCRIBE_ENV_FILE=...), or give this "
            "checkout its own LOOPSCRIBE_HOME") from exc


def describe_error(exc: Exception, limit: int = 400) -> str:
    """A one-line reason: Label Studio API errors by status and body, not by their response headers;
    connection failures by what could not be reached."""
    if hasattr(exc, "status_code") and hasattr(exc, "body"):
        text = f"Label Studio answered {exc.status_code}: {exc.body}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:limit]


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files, folders (recursive, audio suffixes only) and globs, de-duplicated, in order."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob(pattern, recursive=True))] or [Path(pattern)]
        for m in matches:
            if m.is_dir():
                for f in sorted(m.rglob("*")):
                    if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES:
                        found.setdefault(f.resolve(), None)
            else:
                found.setdefault(m.resolve() if m.exists() else m, None)
    return list(found)


def create_project(ls: LabelStudio, title: str, label_config: str) -> int:
    project = ls.projects.create(title=title, label_config=label_config).id
    if project is None:
        raise EnvironmentProblem(f"Label Studio created project {title!r} without an id")
    return project


def find_or_create_project(ls: LabelStudio, title: str, label_config: str) -> int:
    for p in ls.projects.list():
        if p.title == title and p.id is not None:
            return p.id
    return create_project(ls, title, label_config)


def ensure_local_storage(ls: LabelStudio, project: int, path: Path) -> None:
    """Label Studio serves /data/local-files/ only below a local storage of the project; never synced."""
    for storage in ls.import_storage.local.list(project=project):
        if storage.path == str(path):
            return
    path.mkdir(parents=True, exist_ok=True)
    ls.import_storage.local.create(project=project, path=str(path), title="loopscribe clips",
                                   regex_filter="^$", use_blob_urls=True)


@dataclass
class ImportReport:
    files: int = 0
    tasks_created: int = 0
    duplicates: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    task_ids: list[int] = field(default_factory=list)


def existing_hashes(ls: LabelStudio, project: int) -> set[str]:
    return {t.data.get("sha256") for t in ls.tasks.list(project=project, fields="all") if t.data.get("sha256")}


def import_audio(
    ls: LabelStudio,
    settings: Settings,
    project: int,
    paths: list[Path],
    *,
    media_root: Path,
    storage: str = "local",
    progress: bool = True,
) -> ImportReport:
    """Decode, split at pauses into ≤30 s clips, store them where Label Studio serves them, create tasks."""
    from tqdm import tqdm

    config = parse_label_config(ls.projects.get(id=project).label_config)
    clip_dir = media_root / f"project-{project}"
    if storage == "local":
        ensure_local_storage(ls, project, clip_dir)
    seen = existing_hashes(ls, project)
    report = ImportReport()
    pending: list[tuple[dict, Path]] = []
    for path in tqdm(paths, desc="importing", unit="file", disable=not progress):
        report.files += 1
        try:
            audio = decode_audio(path, max_seconds=settings.max_audio_seconds, timeout=settings.ffmpeg_timeout)
        except AudioDecodeError as exc:
            report.failed[str(path)] = exc.reason
            log.warning("skipping %s", exc)
            continue
        source_hash = content_hash(audio)
        for index, (start, end) in enumerate(split_at_pauses(audio)):
            clip = audio[start:end]
            digest = content_hash(clip)
            if digest in seen:
                report.duplicates += 1
                continue
            seen.add(digest)
            clip_path = clip_dir / f"{digest[:16]}-{Path(path).stem[:60]}-{index:03d}.wav"
            _write_wav(clip, clip_path)
            data = {
                "source_file": str(path), "source_sha256": source_hash, "source_offset": round(start / SAMPLE_RATE, 3),
                "source_duration": round(audio.size / SAMPLE_RATE, 3), "segment_index": index,
                "duration": round(clip.size / SAMPLE_RATE, 3), "sha256": digest,
            }
            pending.append((data, clip_path))
    for batch_start in range(0, len(pending), 100):
        batch = pending[batch_start : batch_start + 100]
        if storage == "local":
            tasks = [{"data": d | {config.audio_key: f"/data/local-files/?d={p.relative_to(media_root)}"}}
                     for d, p in batch]
            response = ls.projects.import_tasks(id=project, request=tasks,  # type: ignore[arg-type]  # dicts
                                                return_task_ids=True)
            ids = list(response.task_ids or [])  # type: ignore[attr-defined]  # present with return_task_ids
        else:
            ids = _upload(settings, ls, project, batch, config.audio_key)
        report.task_ids += ids
        report.tasks_created += len(ids)
    return report


def _upload(settings: Settings, ls: LabelStudio, project: int, batch: list[tuple[dict, Path]], key: str) -> list[int]:
    """Multipart upload (one distinct field per file, FACTS.md), then our metadata is added to each task."""
    auth = AudioFetcher(settings).auth
    ids = []
    for data, path in batch:  # one file per request: the response maps it to its task id unambiguously
        with open(path, "rb") as f:
            r = requests.post(f"{settings.label_studio_url}/api/projects/{project}/import",
                              params={"return_task_ids": "true"}, headers=auth.header(),
                              files={"file0": (path.name, f, "audio/wav")}, timeout=120)
        r.raise_for_status()
        # Label Studio names the tasks this request created (never "the newest task": imports may run at once).
        created = r.json().get("task_ids") or []
        if len(created) != 1:
            raise EnvironmentProblem(f"uploading {path.name} created {len(created)} tasks, expected 1 (Label Studio's "
                               f"import answered without task_ids: an edition that imports asynchronously?)")
        task_id = int(created[0])
        task = ls.tasks.get(id=str(task_id))
        ls.tasks.update(id=str(task_id), data=dict(task.data or {}) | data)
        ids.append(task_id)
        path.unlink(missing_ok=True)  # Label Studio holds the uploaded copy
    return ids


def _write_wav(samples: np.ndarray, path: Path) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    sf.write(tmp, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


@dataclass
class PredictReport:
    predicted: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    audio_seconds: float = 0.0


def predict_project(
    ls: LabelStudio,
    settings: Settings,
    project: int,
    engine: Transcriber,
    *,
    only_missing: bool = True,
    only_unlabeled: bool = False,
    task_ids: Sequence[int] | None = None,
    ahead: float | None = None,
    done_since: float | None = None,
    batch_tasks: int = 64,
    progress: bool = True,
    on_batch: Callable[[], object] | None = None,
) -> PredictReport:
    """Bulk pre-annotation with the live model; sets model_version and uncertainty sampling at the end.

    ``only_unlabeled`` leaves annotated tasks alone (re-scoring after a promotion: only the
    pool annotators have yet to see needs new scores). ``task_ids`` limits the run to those tasks
    (one shard of a queued run), fetched one by one; ``ahead`` is the cutoff that shard's run decided
    when it was planned (:func:`~ml_backend.splits.ahead_cutoff`; None: decided here). ``done_since``
    (a Unix time) also skips tasks whose prediction of the live version was made after it, so a shard
    that runs again after its worker died adds nothing twice even when ``only_missing`` is off.
    ``on_batch`` is called after each batch (a worker's heartbeat). Audio of the next batch is fetched
    and decoded in background threads while the engine decodes the current one, so Label Studio round
    trips cost little.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    version = engine.model_version
    about = ls.projects.get(id=project)
    label_config = about.label_config or ""
    config = parse_label_config(label_config)
    interface = LabelInterface(label_config)
    options = TranscribeOptions.for_project(config.language_values)  # only the project's languages
    fetcher = AudioFetcher(settings)
    report = PredictReport()
    todo, holding_version, listed = [], 0, []
    for task in (ls.tasks.list(project=project, fields="all") if task_ids is None else _tasks_by_id(ls, task_ids)):
        if task is None or task.project != project:  # deleted (or moved) since the run was planned
            report.skipped += 1
            continue
        listed.append(task.id)
        mine = [p for p in (task.predictions or []) if p.model_version == version]
        holding_version += bool(mine)
        if only_unlabeled and (getattr(task, "total_annotations", 0) or 0) > 0:
            report.skipped += 1
        elif only_missing and mine:
            report.skipped += 1
        elif done_since is not None and any(p.created_at and p.created_at.timestamp() >= done_since for p in mine):
            report.skipped += 1
        else:
            todo.append(task)
    if ahead is None:  # the whole project was just listed; a shard of a run from before runs kept the cutoff lists it
        ahead = ahead_cutoff(project, about.task_number,
                             (lambda: listed) if task_ids is None else (lambda: project_task_ids(ls, project)),
                             settings.heldout_fraction, settings.heldout_ahead, settings.heldout_ahead_tasks)

    def load(task) -> np.ndarray | str:
        try:
            return load_task_audio(fetcher, task.id, task.data, config.audio_key)
        except (AudioFetchError, AudioDecodeError) as exc:
            log.warning("task %s: no prediction: %s", task.id, exc)
            return exc.reason

    batches = [todo[i : i + batch_tasks] for i in range(0, len(todo), batch_tasks)]
    with ThreadPoolExecutor(4) as pool, tqdm(total=len(todo), desc="pre-annotating", unit="task",
                                             disable=not progress) as bar:
        upcoming = [pool.map(load, b) for b in batches[:1]]
        for n, batch in enumerate(batches):
            loaded = list(upcoming.pop(0))
            if n + 1 < len(batches):
                upcoming.append(pool.map(load, batches[n + 1]))  # prefetch while this batch decodes
            ids = [t.id for t, a in zip(batch, loaded) if not isinstance(a, str)]
            clips = [a for a in loaded if not isinstance(a, str)]
            report.failed.update({t.id: a for t, a in zip(batch, loaded) if isinstance(a, str)})
            if clips:
                transcripts = engine.transcribe(clips, options)
                predictions = checked_predictions(
                    interface, [to_prediction(t, config, settings.unsure_word_probability,
                                              serving_score(t.confidence, project, i, settings.heldout_fraction,
                                                            ahead)) | {"task": i}
                                for i, t in zip(ids, transcripts)], report, config.unsure_name)
                created = ls.projects.import_predictions(id=project, request=predictions).created  # type: ignore[arg-type]
                if created is not None and created < len(predictions):  # Label Studio drops what it finds invalid
                    log.warning("project %s: Label Studio kept %d of %d predictions", project, created,
                                len(predictions))
                report.predicted += created if created is not None else len(predictions)
                report.audio_seconds += sum(c.size for c in clips) / SAMPLE_RATE
            bar.update(len(batch))
            if on_batch is not None:
                on_batch()
    if report.predicted or holding_version:  # Label Studio refuses a version no prediction carries
        ls.projects.update(id=project, model_version=version, sampling=UNCERTAINTY_SAMPLING)
    return report


def project_task_ids(ls: LabelStudio, project: int) -> list[int]:
    """Every task id of ``project`` (the task list without annotations or predictions)."""
    return [int(t.id) for t in ls.tasks.list(project=project, fields="task_only", page_size=1000) if t.id is not None]


def _tasks_by_id(ls: LabelStudio, task_ids: Sequence[int]) -> Iterator[Any]:
    """The tasks, fetched four at a time; None for one Label Studio no longer has."""
    from concurrent.futures import ThreadPoolExecutor

    from label_studio_sdk.core.api_error import ApiError

    def get(task_id: int):
        try:
            return ls.tasks.get(id=str(task_id))
        except ApiError as exc:
            if exc.status_code == 404:
                return None
            raise

    with ThreadPoolExecutor(4) as pool:
        yield from pool.map(get, task_ids)


def checked_predictions(interface: LabelInterface, predictions: list[dict], report: PredictReport,
                        optional_control: str | None) -> list[dict]:
    """Predictions as Label Studio will accept them. Its bulk import drops an invalid prediction without saying
    which; so each is validated here first (Label Studio's own validator). One that fails only because of its
    optional regions (``optional_control``: the "unsure" Labels) is sent without them; one that fails otherwise
    is reported, not sent."""
    accepted = []
    for p in predictions:
        errors = interface.validate_prediction(p, return_errors=True)
        if errors:
            plain = p | {"result": [r for r in p["result"] if r.get("from_name") != optional_control]}
            if not interface.validate_prediction(plain, return_errors=True):
                log.warning("task %s: regions left out: %s", p["task"], "; ".join(errors)[:300])
                accepted.append(plain)
            else:
                report.failed[p["task"]] = "Label Studio would refuse the prediction: " + "; ".join(errors)[:300]
            continue
        accepted.append(p)
    return accepted


def submit_transcript(ls: LabelStudio, task, text: str, language: str | None = None) -> int:
    """Submit an annotation the way an annotator does: start from the task's first prediction, set the
    transcript (and language), submit. Label Studio then sends ANNOTATION_CREATED with the prediction."""
    prediction = task.predictions[0] if task.predictions else None
    result = [dict(r) for r in (prediction.result if prediction else [])]
    for r in result:
        if r["type"] == "textarea" and "start" not in r.get("value", {}):
            r["value"] = {"text": [text]}
        elif r["type"] == "choices" and language and r["from_name"].lower().startswith("lang"):
            r["value"] = {"choices": [language]}
    if prediction is None:
        config = parse_label_config(ls.projects.get(id=task.project).label_config)
        result = [{"from_name": config.transcript_name, "to_name": config.audio_name, "type": "textarea",
                   "value": {"text": [text]}}]
    created = ls.annotations.create(id=task.id, result=result, was_cancelled=False, lead_time=1.0,
                                    parent_prediction=prediction.id if prediction else None)
    return created.id


def connect_backend(ls: LabelStudio, project: int, settings: Settings, title: str = "Loopscribe Whisper") -> int:
    """Connect the ML backend (basic auth when configured) and put the webhook secret on its webhook.

    Label Studio calls /health and /setup on connect and auto-registers ``<url>/webhook``
    for all actions, without any auth header: the secret header is added here.
    """
    url = settings.backend_url
    backend = next((b for b in ls.ml.list(project=project) if b.url.rstrip("/") == url), None)
    if backend is None:
        auth = {}
        if settings.basic_auth_user and settings.basic_auth_pass:
            auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": settings.basic_auth_user,
                    "basic_auth_pass": settings.basic_auth_pass}
        backend = ls.ml.create(project=project, url=url, title=title, is_interactive=False, **auth)
    if settings.webhook_secret:
        from ml_backend.app import WEBHOOK_SECRET_HEADER

        for hook in ls.webhooks.list(project=project):
            if hook.url.rstrip("/") == f"{url}/webhook":
                ls.webhooks.update(id=hook.id, headers={WEBHOOK_SECRET_HEADER: settings.webhook_secret})
    return backend.id
