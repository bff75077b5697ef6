"""Dataset export: every format from a real Label Studio project with real annotations.

Label Studio 1.23.2 runs as a real process; audio is imported (and the long recording split)
through the CLI code path, pre-annotated by the bundled Whisper base, annotated through
Label Studio's API. The `hf` export is loaded back with Hugging Face `datasets`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jiwer
import pytest
import soundfile as sf

from loopscribe import labelstudio
from ml_backend.annotations import extract
from ml_backend.ledger import Ledger
from ml_backend.text import normalize
from training.dataset import AnnotatedTask
from training.export import (
    Cue,
    ExportError,
    ExportOptions,
    ExportRecord,
    atomic_directory,
    export_project,
    render_subtitles,
    source_cues,
)

CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()
MIT = "mit_license_en_de.mp3"


# ---- unit: subtitles, atomic output, options ---------------------------------------------------------

def _record(task: int, text: str, offset: float, duration: float, source: str = "talk.mp3", index: int = 0):
    data = {"source_file": f"/in/{source}", "source_sha256": source, "source_offset": offset,
            "duration": duration, "segment_index": index}
    t = AnnotatedTask(task=task, data=data, text=text, language="en", annotation=task, annotator="a",
                      predicted_text=None, predicted_language=None, prediction_score=None, model_version=None)
    return ExportRecord(t, "train", duration)


def test_cues_are_grouped_by_source_and_ordered_by_offset():
    records = [_record(3, "third", 59.5, 0.5, index=2), _record(1, "first", 0.0, 29.5),
               _record(2, "second", 29.5, 30.0, index=1), _record(9, "other file", 0.0, 2.0, source="b.wav")]
    groups = source_cues(records)
    assert set(groups) == {"talk", "b"}
    assert groups["talk"] == [Cue(0.0, 29.5, "first"), Cue(29.5, 59.5, "second"), Cue(59.5, 60.0, "third")]


def test_srt_and_vtt_rendering():
    cues = [Cue(0.0, 1.5, "one"), Cue(3661.25, 3662.0, "two")]
    assert render_subtitles(cues, "srt") == ("1\n00:00:00,000 --> 00:00:01,500\none\n\n"
                                             "2\n01:01:01,250 --> 01:01:02,000\ntwo\n")
    assert render_subtitles(cues, "vtt") == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\none\n\n"
                                             "01:01:01.250 --> 01:01:02.000\ntwo\n")


def test_failed_export_leaves_no_output(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=False) as root:
        (root / "half.jsonl").write_text("{}\n")
        raise RuntimeError("disk full")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_replacing_an_export_is_atomic_and_needs_overwrite(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="--overwrite"), atomic_directory(out, overwrite=False):
        pass
    with atomic_directory(out, overwrite=True) as root:
        (root / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old export stays complete until the new one is
    assert [p.name for p in out.iterdir()] == ["new.txt"] and len(list(tmp_path.iterdir())) == 1


def test_options_are_checked():
    with pytest.raises(ExportError, match="unknown format"):
        ExportOptions(format="csv")
    with pytest.raises(ExportError, match="exclude each other"):
        ExportOptions(format="hf", only_corrected=True, only_verified=True)


# ---- integration: a real Label Studio project --------------------------------------------------------

@pytest.fixture(scope="module")
def studio(settings, engine, tmp_path_factory, launch_stack):
    with launch_stack(settings, tmp_path_factory, label_studio_only=True) as stack_:
        s, paths, env_file = stack_
        yield replace(s, heldout_fraction=0.4), paths, env_file


@pytest.fixture(scope="module")
def ls(studio):
    return labelstudio.client(studio[0])


@pytest.fixture(scope="module")
def project(studio, ls, engine, shared_audio, transcripts) -> dict:
    """Imported (the long recording split), pre-annotated, then annotated as annotators would.

    Returns ``{"id", "expected": {task: (text, origin)}, "unannotated", "cancelled", "broken", "mit"}``.
    """
    s, paths, _ = studio
    project = labelstudio.find_or_create_project(ls, "export", CONFIG)
    names = [MIT, "comfyui_en.mp3", "jfk_en.flac", "zh_short.flac", "dictee_fr.aiff", "one_two_three_en.wav"]
    report = labelstudio.import_audio(ls, s, project, [shared_audio / n for n in names], media_root=paths.media,
                                      progress=False)
    assert not report.failed
    broken = ls.projects.import_tasks(id=project, return_task_ids=True, request=[
        {"data": {"audio": f"/data/upload/{project}/gone.wav", "duration": 2.0}}]).task_ids[0]
    labelstudio.predict_project(ls, s, project, engine, progress=False)
    tasks = {t.id: t for t in ls.tasks.list(project=project, fields="all")}
    by_name: dict[str, list] = {}
    for t in tasks.values():
        by_name.setdefault(Path(str(t.data.get("source_file", ""))).name, []).append(t)

    def predicted_text(task) -> str:
        return extract(task.predictions[0].result).text

    expected: dict[int, tuple[str, str | None]] = {}
    for t in by_name[MIT]:  # accepted unchanged: verified
        labelstudio.submit_transcript(ls, t, predicted_text(t))
        expected[t.id] = (predicted_text(t), "verified")
    comfy = by_name["comfyui_en.mp3"][0]
    assert normalize(predicted_text(comfy)) != normalize(transcripts["comfyui_en.mp3"]["text"])
    labelstudio.submit_transcript(ls, comfy, transcripts["comfyui_en.mp3"]["text"])
    expected[comfy.id] = (transcripts["comfyui_en.mp3"]["text"], "correction")
    jfk = by_name["jfk_en.flac"][0]
    labelstudio.submit_transcript(ls, jfk, predicted_text(jfk) + " Thank you.")
    expected[jfk.id] = (predicted_text(jfk) + " Thank you.", "correction")
    zh = by_name["zh_short.flac"][0]
    labelstudio.submit_transcript(ls, zh, transcripts["zh_short.flac"]["text"])
    expected[zh.id] = (transcripts["zh_short.flac"]["text"], None)
    cancelled = by_name["dictee_fr.aiff"][0]
    ls.annotations.create(id=cancelled.id, result=[], was_cancelled=True)
    labelstudio.submit_transcript(ls, tasks[broken], "audio that is gone")
    return {"id": project, "expected": expected, "unannotated": by_name["one_two_three_en.wav"][0].id,
            "cancelled": cancelled.id, "broken": broken, "mit": sorted(t.id for t in by_name[MIT])}


def run_export(studio, ls, project, out: Path, **options):
    return export_project(studio[0], ls, project["id"], out, ExportOptions(**options), progress=False)


@pytest.mark.slow
def test_hf_export_loads_with_datasets_and_matches_the_annotations(studio, ls, project, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    report = run_export(studio, ls, project, out, format="hf")
    assert report.failed.keys() == {project["broken"]}  # reported, and the rest is exported
    loaded = datasets.load_dataset("audiofolder", data_dir=str(out))
    rows = {row["task_id"]: (split, row) for split in loaded for row in loaded[split]}
    assert rows.keys() == project["expected"].keys()
    frozen = Ledger(studio[0].ledger_url).splits.freeze(project["id"], {})
    for task, (split, row) in rows.items():
        text, origin = project["expected"][task]
        assert row["transcription"] == text
        assert origin is None or row["origin"] == origin
        assert row["split"] == frozen[task] and split == {"train": "train", "heldout": "test"}[row["split"]]
        assert row["audio"]["sampling_rate"] == 16_000
        assert abs(len(row["audio"]["array"]) / 16_000 - row["duration"]) < 0.01
        assert row["prediction"] and 0 < row["confidence"] <= 1 and row["model_version"] and row["annotator"]
    assert {r["language"] for _, r in rows.values()} >= {"en", "de", "zh"}
    assert sum(report.by_split.values()) == len(rows)


@pytest.mark.slow
def test_filters(studio, ls, project, tmp_path):
    expected = project["expected"]
    corrected = run_export(studio, ls, project, tmp_path / "c", format="jsonl", only_corrected=True)
    verified = run_export(studio, ls, project, tmp_path / "v", format="jsonl", only_verified=True)
    read = lambda d: [json.loads(line) for line in (d / "data.jsonl").read_text().splitlines()]  # noqa: E731
    assert {r["task_id"] for r in read(tmp_path / "v")} == set(project["mit"])
    assert {r["task_id"] for r in read(tmp_path / "c")} >= {t for t, (_, o) in expected.items() if o == "correction"}
    assert corrected.exported + verified.exported == len(expected)

    held = run_export(studio, ls, project, tmp_path / "h", format="jsonl", split="heldout")
    assert {r["split"] for r in read(tmp_path / "h")} <= {"heldout"}
    assert held.exported == held.by_split.get("heldout", 0)
    german = run_export(studio, ls, project, tmp_path / "de", format="jsonl", languages=("de",))
    assert german.exported >= 1 and {r["language"] for r in read(tmp_path / "de")} == {"de"}
    long = run_export(studio, ls, project, tmp_path / "long", format="jsonl", min_duration=8.0, max_duration=30.0)
    assert long.exported >= 2 and all(8.0 <= r["duration"] <= 30.0 for r in read(tmp_path / "long"))

    everything = run_export(studio, ls, project, tmp_path / "all", format="jsonl", include_predictions=True)
    rows = {r["task_id"]: r for r in read(tmp_path / "all")}
    assert rows[project["unannotated"]]["origin"] == "model" and rows[project["unannotated"]]["transcription"]
    assert everything.exported > len(expected)


@pytest.mark.slow
def test_nemo_manifest(studio, ls, project, tmp_path):
    out = tmp_path / "nemo"
    report = run_export(studio, ls, project, out, format="nemo")
    lines = [json.loads(line) for f in sorted(out.glob("*_manifest.json")) for line in f.read_text().splitlines()]
    assert len(lines) == report.exported == len(project["expected"])
    texts = {text for text, _ in project["expected"].values()}
    for line in lines:
        assert set(line) == {"audio_filepath", "duration", "text", "lang"}
        info = sf.info(out / line["audio_filepath"])
        assert info.samplerate == 16_000 and info.channels == 1 and abs(info.duration - line["duration"]) < 0.01
        assert line["text"] in texts and line["lang"]


@pytest.mark.slow
def test_srt_of_a_split_recording_keeps_order_and_offsets(studio, ls, project, transcripts, tmp_path):
    out = tmp_path / "srt"
    run_export(studio, ls, project, out, format="srt")
    srt = (out / "mit_license_en_de.srt").read_text()
    blocks = [b.splitlines() for b in srt.strip().split("\n\n")]
    tasks = sorted((ls.tasks.get(id=t) for t in project["mit"]), key=lambda t: t.data["source_offset"])
    assert len(blocks) == len(tasks) >= 2
    previous_end = 0.0
    for i, (block, task) in enumerate(zip(blocks, tasks), 1):
        assert block[0] == str(i)
        start, end = (_seconds(x) for x in block[1].split(" --> "))
        assert abs(start - task.data["source_offset"]) < 0.002
        assert abs(end - (task.data["source_offset"] + task.data["duration"])) < 0.002
        assert start >= previous_end - 0.002 and end > start
        assert " ".join(block[2:]) == project["expected"][task.id][0]
        previous_end = end
    assert previous_end == pytest.approx(transcripts[MIT]["segments"][-1]["end"], abs=0.5)
    # the reassembled text reads as the recording does: in order it matches, reversed it does not
    truth = normalize(" ".join(s["text"] for s in transcripts[MIT]["segments"]))
    cues = [normalize(" ".join(b[2:])) for b in blocks]
    in_order, reversed_ = jiwer.wer(truth, " ".join(cues)), jiwer.wer(truth, " ".join(reversed(cues)))
    assert in_order < 0.35 < reversed_, (in_order, reversed_)

    run_export(studio, ls, project, tmp_path / "vtt", format="vtt")
    vtt = (tmp_path / "vtt" / "mit_license_en_de.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt.count(" --> ") == len(tasks)


@pytest.mark.slow
def test_cli_export_prints_a_summary_and_refuses_to_clobber(studio, project, tmp_path):
    s, _, env_file = studio
    env = dict(os.environ, LOOPSCRIBE_ENV_FILE=str(env_file), LOOPSCRIBE_HOME=str(s.home), HELDOUT_FRACTION="0.4")
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "loopscribe.cli", "export", "--project", str(project["id"]), "--format", "jsonl",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"exported {len(project['expected'])} utterances" in done.stdout
    assert "export jsonl" in done.stderr  # the progress bar
    assert (out / "data.jsonl").is_file() and len(list((out / "audio").iterdir())) == len(project["expected"])
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def _seconds(stamp: str) -> float:
    h, m, rest = stamp.split(":")
    s, ms = rest.split(",")
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000
