"""Training data from Label Studio: annotated tasks, their audio (cached), and the frozen held-out split."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml_backend.annotations import extract
from ml_backend.audio import AudioDecodeError
from ml_backend.fetch import AudioFetcher, AudioFetchError, load_task_audio
from ml_backend.label_config import TranscriptionConfig, parse_label_config
from ml_backend.ledger import Ledger
from ml_backend.settings import Settings

from .lora import Example

log = logging.getLogger(__name__)

HELDOUT, TRAIN = "heldout", "train"


@dataclass(frozen=True)
class AnnotatedTask:
    """A task's newest submitted (not cancelled) annotation, read with the project's config."""

    task: int
    data: dict = field(repr=False)
    text: str
    language: str | None
    annotation: int
    annotator: str | None
    predicted_text: str | None
    predicted_language: str | None
    prediction_score: float | None
    model_version: str | None


def export_annotated(ls, project: int) -> tuple[TranscriptionConfig, list[AnnotatedTask]]:
    """Label Studio's JSON export of annotated tasks, one :class:`AnnotatedTask` each."""
    config = parse_label_config(ls.projects.get(id=project).label_config)
    raw = b"".join(ls.projects.exports.download_sync(project, export_type="JSON", download_all_tasks=False,
                                                     download_resources=False))
    out = []
    for task in json.loads(raw or b"[]"):
        submitted = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not submitted:
            continue
        ann = max(submitted, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
        human = extract(ann.get("result"), config)
        prediction = ann.get("prediction") or {}
        predicted = extract(prediction.get("result"), config) if prediction.get("result") else None
        if not human.text:
            log.info("task %s: annotation %s has no transcript; skipped", task["id"], ann.get("id"))
            continue
        annotator = ann.get("completed_by")
        if isinstance(annotator, dict):
            annotator = annotator.get("email") or annotator.get("id")
        out.append(AnnotatedTask(
            task=int(task["id"]), data=task.get("data") or {}, text=human.text,
            language=human.language or (predicted.language if predicted else None),
            annotation=int(ann["id"]), annotator=str(annotator) if annotator is not None else None,
            predicted_text=predicted.text if predicted else None,
            predicted_language=predicted.language if predicted else None,
            prediction_score=prediction.get("score"), model_version=prediction.get("model_version"),
        ))
    return config, out


def heldout_by_hash(project: int, task: int, fraction: float) -> bool:
    """Deterministic, stable assignment: the same task always lands on the same side."""
    digest = int(hashlib.sha256(f"{project}:{task}".encode()).hexdigest()[:8], 16)
    return digest % 10_000 < fraction * 10_000


def frozen_splits(ledger: Ledger, project: int, tasks: list[int], fraction: float) -> dict[int, str]:
    """Splits as first assigned; a task once held out is never trained on, even if the fraction changes."""
    proposed = {t: HELDOUT if heldout_by_hash(project, t, fraction) else TRAIN for t in tasks}
    frozen = ledger.freeze_splits(project, proposed)
    return {t: frozen[t] for t in tasks}


class AudioCache:
    """Decoded task audio as .npy under ``$LOOPSCRIBE_HOME/cache/audio``, keyed by task and audio URL."""

    def __init__(self, settings: Settings):
        self.root = settings.home / "cache" / "audio"
        self.fetcher = AudioFetcher(settings)

    def _path(self, task: int, url: str) -> Path:
        return self.root / f"{task}-{hashlib.sha1(url.encode()).hexdigest()[:12]}.npy"

    def load(self, task: int, data: dict, key: str) -> np.ndarray:
        path = self._path(task, str(data.get(key)))
        if path.is_file():
            return np.load(path)
        samples = load_task_audio(self.fetcher, task, data, key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part.npy")
        np.save(tmp, samples)
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
