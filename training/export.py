"""Export a project's corrected data set in the formats data tools load directly.

    hf     Hugging Face ``audiofolder``: ``train/`` and ``test/`` (the frozen held-out split), each with
           16 kHz WAV clips and ``metadata.jsonl``; ``datasets.load_dataset("audiofolder", data_dir=DIR)``.
           Missing values are typed, not null (``""``, confidence ``-1``), as audiofolder requires.
    nemo   NeMo ASR manifests ``train_manifest.json`` / ``heldout_manifest.json`` + ``audio/``
    jsonl  ``data.jsonl``, one record per task with every field + ``audio/``
    srt    one ``.srt`` per source recording: the utterances at their original offsets
    vtt    the same as WebVTT

The split is the one training uses (frozen in the ledger on first sight, so a task exported
as held-out never enters training). Output is written to a sibling temporary directory and
renamed into place: a half-written export never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ml_backend.audio import SAMPLE_RATE, AudioDecodeError
from ml_backend.errors import LoopscribeError
from ml_backend.fetch import AudioFetchError
from ml_backend.ledger import Ledger
from ml_backend.settings import Settings
from ml_backend.splits import HELDOUT, TRAIN, confidence_of

from .dataset import (
    AnnotatedTask,
    AudioCache,
    annotated,
    frozen_splits,
    project_export,
)

log = logging.getLogger(__name__)

FORMATS = ("hf", "nemo", "jsonl", "srt", "vtt")
HF_SPLIT_DIRS = {TRAIN: "train", HELDOUT: "test"}  # directory names `audiofolder` maps to splits


class ExportError(LoopscribeError):
    """An export that cannot start (bad options, output in the way); nothing was written."""


@dataclass(frozen=True)
class ExportOptions:
    format: str
    only_corrected: bool = False
    """Only annotations that changed the model's transcript or language (or were written from scratch)."""
    only_verified: bool = False
    """Only annotations that accepted the prediction unchanged."""
    include_predictions: bool = False
    """Also tasks nobody annotated yet, with the model's transcript (``origin: model``), e.g. for subtitles."""
    split: str = "all"
    """``train``, ``heldout`` or ``all``."""
    min_duration: float | None = None
    max_duration: float | None = None
    languages: tuple[str, ...] = ()
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.only_corrected and self.only_verified:
            raise ExportError("--only-corrected and --only-verified exclude each other")
        if self.split not in (TRAIN, HELDOUT, "all"):
            raise ExportError(f"unknown split {self.split!r}; choose train, heldout or all")

    @property
    def writes_audio(self) -> bool:
        return self.format in ("hf", "nemo", "jsonl")


@dataclass
class ExportRecord:
    """One exported utterance: the annotation, its origin and the model's prediction beside it."""

    task: AnnotatedTask
    split: str
    duration: float | None
    file_name: str | None = None

    def metadata(self) -> dict:
        t = self.task
        return {
            "file_name": self.file_name, "transcription": t.text, "language": t.language or "",
            "split": self.split, "task_id": t.task, "annotation_id": t.annotation or 0,
            "annotator": t.annotator or "", "origin": t.origin,
            "prediction": t.predicted_text or "", "prediction_language": t.predicted_language or "",
            "confidence": confidence_of(float(t.prediction_score)) if t.prediction_score is not None else None,
            "model_version": t.model_version or "", "duration": self.duration,
            "source_file": str(t.data.get("source_file") or ""),
            "source_offset": float(t.data.get("source_offset") or 0.0),
        }


@dataclass
class ExportReport:
    out: Path
    format: str
    exported: int = 0
    by_split: dict[str, int] = field(default_factory=dict)
    audio_seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    files: int = 0

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def select(tasks: list[AnnotatedTask], splits: dict[int, str], options: ExportOptions,
           report: ExportReport) -> list[ExportRecord]:
    """Apply the filters that need no audio; duration is checked again after decoding when unknown."""
    chosen = []
    for t in tasks:
        split = splits[t.task]
        if options.only_corrected and t.origin != "correction":
            report.skip("not a correction")
        elif options.only_verified and t.origin != "verified":
            report.skip("not verified")
        elif options.split != "all" and split != options.split:
            report.skip(f"split {split}")
        elif options.languages and (t.language or "") not in options.languages:
            report.skip("language")
        elif not _duration_ok(t.duration, options):
            report.skip("duration")
        else:
            chosen.append(ExportRecord(t, split, t.duration))
    return sorted(chosen, key=lambda r: r.task.task)


def _duration_ok(duration: float | None, options: ExportOptions) -> bool:
    if duration is None:
        return True
    if options.min_duration is not None and duration < options.min_duration:
        return False
    return options.max_duration is None or duration <= options.max_duration


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (use --overwrite to replace it)")


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only when the block succeeds."""
    out = out.resolve()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _clip_name(record: ExportRecord) -> str:
    stem = Path(str(record.task.data.get("source_file") or "task")).stem
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60] or "task"
    return f"{record.task.task:07d}-{stem}.wav"


def _write_wav(samples: np.ndarray, path: Path) -> None:
    import soundfile as sf

    sf.write(path, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def write_audio(records: list[ExportRecord], cache: AudioCache, audio_key: str, dir_for, options: ExportOptions,
                report: ExportReport, progress: bool, workers: int = 4) -> list[ExportRecord]:
    """Fetch (cached), decode and write each clip as 16 kHz mono WAV; a task whose audio fails is reported."""
    from tqdm import tqdm

    def one(record: ExportRecord) -> tuple[ExportRecord, np.ndarray | str]:
        try:
            return record, cache.load(record.task.task, record.task.data, audio_key)
        except (AudioFetchError, AudioDecodeError) as exc:
            return record, exc.reason

    kept = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(records), desc=f"export {options.format}", unit="clip", disable=not progress) as bar:
        for record, audio in pool.map(one, records):
            bar.update()
            if isinstance(audio, str):
                log.warning("task %s: not exported: %s", record.task.task, audio)
                report.failed[record.task.task] = audio
                continue
            record.duration = round(audio.size / SAMPLE_RATE, 3)
            if not _duration_ok(record.duration, options):
                report.skip("duration")
                continue
            folder = dir_for(record)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / _clip_name(record)
            _write_wav(audio, path)
            record.file_name = path.name
            report.audio_seconds += record.duration
            kept.append(record)
    return kept


def _jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_hf(records: list[ExportRecord], root: Path) -> int:
    by_split: dict[str, list[dict]] = {}
    for r in records:
        row = r.metadata()
        if row["confidence"] is None:  # `audiofolder` needs one type per column in every split: no nulls
            row["confidence"] = -1.0
        by_split.setdefault(r.split, []).append(row)
    for split, rows in by_split.items():
        _jsonl(root / HF_SPLIT_DIRS[split] / "metadata.jsonl", rows)
    return len(by_split)


def write_nemo(records: list[ExportRecord], root: Path) -> int:
    """NeMo manifests; ``audio_filepath`` is relative to the manifest (NeMo resolves it so)."""
    by_split: dict[str, list[dict]] = {}
    for r in records:
        by_split.setdefault(r.split, []).append({
            "audio_filepath": f"audio/{r.file_name}", "duration": r.duration, "text": r.task.text,
            "lang": r.task.language or "",
        })
    for split, rows in by_split.items():
        _jsonl(root / f"{split}_manifest.json", rows)
    return len(by_split)


def write_jsonl(records: list[ExportRecord], root: Path) -> int:
    rows = []
    for r in records:
        row = r.metadata() | {"audio_filepath": f"audio/{r.file_name}", "data": r.task.data}
        row.pop("file_name")
        rows.append(row)
    _jsonl(root / "data.jsonl", rows)
    return 1


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def source_cues(records: list[ExportRecord]) -> dict[str, list[Cue]]:
    """Utterances grouped by source recording, in time order at their original offsets."""
    groups: dict[str, list[tuple[float, int, Cue]]] = {}
    names: dict[str, str] = {}
    for r in records:
        data = r.task.data
        key = str(data.get("source_sha256") or data.get("source_file") or f"task-{r.task.task}")
        stem = Path(str(data.get("source_file") or f"task-{r.task.task}")).stem or f"task-{r.task.task}"
        names.setdefault(key, re.sub(r"[^\w.-]+", "_", stem)[:80])
        offset = float(data.get("source_offset") or 0.0)
        duration = r.duration or float(data.get("duration") or 0.0)
        order = int(data.get("segment_index") or 0)
        groups.setdefault(key, []).append((offset, order, Cue(offset, offset + duration, r.task.text)))
    out: dict[str, list[Cue]] = {}
    for key, items in groups.items():
        name = names[key]
        if name in out:  # two recordings with one file name: keep both
            name = f"{name}-{key[:8]}"
        out[name] = [cue for _, _, cue in sorted(items, key=lambda i: (i[0], i[1]))]
    return out


def render_subtitles(cues: list[Cue], fmt: str) -> str:
    if fmt == "srt":
        blocks = [f"{i}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{c.text}\n"
                  for i, c in enumerate(cues, 1)]
        return "\n".join(blocks)
    blocks = [f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{c.text}\n" for c in cues]
    return "WEBVTT\n\n" + "\n".join(blocks)


def write_subtitles(records: list[ExportRecord], root: Path, fmt: str) -> int:
    groups = source_cues(records)
    for name, cues in groups.items():
        (root / f"{name}.{fmt}").write_text(render_subtitles(cues, fmt), encoding="utf-8")
    return len(groups)


def export_project(settings: Settings, ls, project: int, out: Path, options: ExportOptions, *,
                   progress: bool = True) -> ExportReport:
    """Read the project from Label Studio, filter, write ``out`` atomically; returns what was written."""
    out = Path(out)
    check_output(out, options.overwrite)  # before any work: a refused export costs nothing
    config, raw = project_export(ls, project, all_tasks=options.include_predictions)
    tasks = [a for task in raw
             if (a := annotated(task, config, with_predictions=options.include_predictions)) is not None]
    splits = frozen_splits(Ledger(settings.ledger_url), project, [t.task for t in tasks], settings.heldout_fraction)
    report = ExportReport(out=out.resolve(), format=options.format)
    records = select(tasks, splits, options, report)
    with atomic_directory(out, options.overwrite) as root:
        if options.writes_audio:
            def dir_for(record: ExportRecord) -> Path:
                return root / HF_SPLIT_DIRS[record.split] if options.format == "hf" else root / "audio"

            records = write_audio(records, AudioCache(settings), config.audio_key, dir_for, options, report,
                                  progress)
        writer = {"hf": write_hf, "nemo": write_nemo, "jsonl": write_jsonl}.get(options.format)
        report.files = writer(records, root) if writer else write_subtitles(records, root, options.format)
        report.exported = len(records)
        for r in records:
            report.by_split[r.split] = report.by_split.get(r.split, 0) + 1
            if r.duration is not None and not options.writes_audio:
                report.audio_seconds += r.duration
    return report
