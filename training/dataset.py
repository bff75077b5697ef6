"""Training data from Label Studio: annotated tasks, their audio (cached), and the frozen held-out split."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml_backend.annotations import classify, extract
from ml_backend.artifacts import LOCAL_CACHE, ArtifactStore
from ml_backend.audio import SAMPLE_RATE, AudioDecodeError
from ml_backend.fetch import AudioFetcher, AudioFetchError, load_task_audio
from ml_backend.label_config import TranscriptionConfig, parse_label_config
from ml_backend.ledger import Ledger
from ml_backend.settings import Settings
from ml_backend.splits import HELDOUT, TRAIN, heldout_by_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One utterance to learn or score: 16 kHz mono audio, its corrected transcript and language."""

    task: int
    audio: np.ndarray = field(repr=False)
    text: str
    language: str | None

    @property
    def duration(self) -> float:
        return self.audio.size / SAMPLE_RATE


@dataclass(frozen=True)
class AnnotatedTask:
    """A task's newest submitted (not cancelled) annotation, read with the project's config.

    ``origin`` is ``correction`` (differs from the prediction it started from, or had none),
    ``verified`` (an unchanged accept) or ``model`` (no annotation: the model's prediction,
    only when asked for by an export).
    """

    task: int
    data: dict = field(repr=False)
    text: str
    language: str | None
    annotation: int | None
    annotator: str | None
    predicted_text: str | None
    predicted_language: str | None
    prediction_score: float | None
    model_version: str | None
    origin: str = "correction"

    @property
    def duration(self) -> float | None:
        value = self.data.get("duration")
        return float(value) if isinstance(value, (int, float, str)) and str(value) else None


def project_export(ls, project: int, *, all_tasks: bool = False) -> tuple[TranscriptionConfig, list[dict]]:
    """The project's parsed config and Label Studio's JSON export (annotated tasks, or all of them)."""
    config = parse_label_config(ls.projects.get(id=project).label_config)
    raw = b"".join(ls.projects.exports.download_sync(project, export_type="JSON", download_all_tasks=all_tasks,
                                                     download_resources=False))
    tasks = json.loads(raw or b"[]")
    if all_tasks:  # the JSON export names predictions by id only; the task list carries them whole
        predictions = {t.id: [{"id": p.id, "result": p.result, "score": p.score, "model_version": p.model_version,
                               "created_at": str(p.created_at or "")} for p in t.predictions or []]
                       for t in ls.tasks.list(project=project, fields="all")}
        for task in tasks:
            task["predictions"] = predictions.get(task["id"], [])
    return config, tasks


def _annotator(ann: dict) -> str | None:
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who) if who is not None else None


def annotated(task: dict, config: TranscriptionConfig, *, with_predictions: bool = False) -> AnnotatedTask | None:
    """The task's newest submitted annotation; without one, its newest prediction if asked for, else None."""
    submitted = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not submitted:
        predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict) and p.get("result")]
        if not with_predictions or not predictions:
            return None
        newest = max(predictions, key=lambda p: (p.get("created_at") or "", p.get("id") or 0))
        model = extract(newest["result"], config)
        if not model.text:
            return None
        return AnnotatedTask(
            task=int(task["id"]), data=task.get("data") or {}, text=model.text, language=model.language,
            annotation=None, annotator=None, predicted_text=model.text, predicted_language=model.language,
            prediction_score=newest.get("score"), model_version=newest.get("model_version"), origin="model")
    ann = max(submitted, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
    human = extract(ann.get("result"), config)
    prediction = ann.get("prediction") or {}
    predicted = extract(prediction.get("result"), config) if prediction.get("result") else None
    if not human.text:
        log.info("task %s: annotation %s has no transcript; skipped", task["id"], ann.get("id"))
        return None
    language = human.language or (predicted.language if predicted else None)
    return AnnotatedTask(
        task=int(task["id"]), data=task.get("data") or {}, text=human.text, language=language,
        annotation=int(ann["id"]), annotator=_annotator(ann),
        predicted_text=predicted.text if predicted else None,
        predicted_language=predicted.language if predicted else None,
        prediction_score=prediction.get("score"), model_version=prediction.get("model_version"),
        origin=classify(human, predicted),
    )


def export_annotated(ls, project: int) -> tuple[TranscriptionConfig, list[AnnotatedTask]]:
    """Label Studio's JSON export of annotated tasks, one :class:`AnnotatedTask` each."""
    config, raw = project_export(ls, project)
    return config, [a for task in raw if (a := annotated(task, config)) is not None]


def frozen_splits(ledger: Ledger, project: int, tasks: list[int], fraction: float) -> dict[int, str]:
    """Splits as first assigned; a task once held out is never trained on, even if the fraction changes."""
    proposed = {t: HELDOUT if heldout_by_hash(project, t, fraction) else TRAIN for t in tasks}
    frozen = ledger.splits.freeze(project, proposed)
    return {t: frozen[t] for t in tasks}


class AudioCache:
    """Decoded task audio as .npy under ``$LOOPSCRIBE_HOME/cache/audio``, keyed by task and audio URL.

    With ``ARTIFACTS_URL`` set, each decoded clip is also stored there (``cache/audio/``), and a
    machine that lacks a clip looks there before fetching and decoding it again: workers on
    several machines decode each clip once between them.
    """

    def __init__(self, settings: Settings):
        self.root = settings.home / "cache" / "audio"
        self.fetcher = AudioFetcher(settings)
        self.shared = ArtifactStore(settings.artifacts_url, settings.home / LOCAL_CACHE) \
            if settings.artifacts_url else None

    def _path(self, task: int, url: str) -> Path:
        return self.root / f"{task}-{hashlib.sha1(url.encode()).hexdigest()[:12]}.npy"

    def load(self, task: int, data: dict, key: str) -> np.ndarray:
        path = self._path(task, str(data.get(key)))
        if path.is_file():
            return np.load(path)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.part.npy")
        shared_key = f"cache/audio/{path.name}"
        if self.shared is not None and self.shared.get_file(shared_key, tmp):
            tmp.replace(path)
            return np.load(path)
        samples = load_task_audio(self.fetcher, task, data, key)
        np.save(tmp, samples)
        if self.shared is not None:
            self.shared.put_file(tmp, shared_key)
        tmp.replace(path)
        return samples


def load_examples(cache: AudioCache, config: TranscriptionConfig,
                  tasks: list[AnnotatedTask]) -> tuple[list[Example], dict[int, str]]:
    """Audio for each annotated task; a task whose audio cannot be had is reported, not fatal."""
    examples, failed = [], {}
    for t in tasks:
        try:
            examples.append(Example(t.task, cache.load(t.task, t.data, config.audio_key), t.text, t.language))
        except (AudioFetchError, AudioDecodeError) as exc:
            log.warning("task %s: skipped: %s", t.task, exc)
            failed[t.task] = exc.reason
    return examples, failed
