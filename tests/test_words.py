"""Word timings (cross-attention + DTW), where the model is unsure, and the regions that show it in Label Studio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml_backend.alignment import dtw, group_words, unsure_stretches
from ml_backend.label_config import parse_label_config
from ml_backend.predictions import to_result
from ml_backend.transcription import Transcription, Word
from ml_backend.uncertainty import Uncertainty

CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()


def brute_force_cost(cost: np.ndarray) -> float:
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    return acc[n, m]


@pytest.mark.parametrize("shape", [(1, 9), (4, 4), (7, 30), (12, 5)])
def test_dtw_finds_the_cheapest_monotonic_path(shape):
    cost = np.random.default_rng(sum(shape)).normal(size=shape)
    tokens, frames = dtw(cost)
    assert (tokens[0], frames[0], tokens[-1], frames[-1]) == (0, 0, shape[0] - 1, shape[1] - 1)
    assert np.all(np.diff(tokens) >= 0) and np.all(np.diff(frames) >= 0)
    assert np.all(np.diff(tokens) + np.diff(frames) >= 1)  # every step moves
    assert cost[tokens, frames].sum() == pytest.approx(brute_force_cost(cost))


def test_words_join_at_spaces_and_keep_punctuation():
    pieces = [(" And", [0]), (" so", [1]), (" Amer", [2]), ("icans", [3]), (",", [4]), (" ask", [5])]
    assert group_words(pieces, "en") == [("And", [0]), ("so", [1]), ("Americans,", [2, 3, 4]), ("ask", [5])]
    assert [w for w, _ in group_words([("自己", [0]), ("的", [1])], "zh")] == ["自己", "的"]


def words(*spec: tuple[str, float]) -> tuple[Word, ...]:
    return tuple(Word(float(i), i + 0.8, text, p) for i, (text, p) in enumerate(spec))


def test_unsure_stretches_are_runs_of_improbable_words():
    ws = words(("Then", 0.9), ("your", 0.9), ("Confu", 0.16), ("i", 0.24), ("folder", 0.9), ("again", 0.3))
    assert unsure_stretches(ws, 0.5) == [(2.0, 3.8, "Confu i"), (5.0, 5.8, "again")]
    assert unsure_stretches(ws, 0.1) == []


def transcription(ws: tuple[Word, ...]) -> Transcription:
    u = Uncertainty(0.5, 1.0, -0.3, 0.01, 1.2, 1, 0.0)
    return Transcription("text", "en", 0.99, 0.7, 6.0, (), u, "v1", ws)


def test_the_default_config_gets_unsure_regions_and_others_do_not():
    config = parse_label_config(CONFIG)
    assert (config.unsure_name, config.unsure_label) == ("unsure", "unsure")  # results store the alias
    assert not config.has_segments  # the unsure Labels are not mistaken for segment labels
    t = transcription(words(("Then", 0.9), ("Confu", 0.16), ("i", 0.24), ("folder", 0.9)))
    regions = [r for r in to_result(t, config, 0.5) if r["type"] == "labels"]
    assert [(r["from_name"], r["value"]["start"], r["value"]["end"], r["value"]["labels"]) for r in regions] == [
        ("unsure", 1.0, 2.8, ["unsure"])]
    assert not [r for r in to_result(t, config, 0.0) if r["type"] == "labels"]  # UNSURE_WORD_PROBABILITY=0: off
    plain = CONFIG.replace('<Label value="Model unsure" alias="unsure" background="#f4a261"/>', "").replace(
        '<Labels name="unsure" toName="audio" choice="single">', "").replace("</Labels>", "")
    assert parse_label_config(plain).unsure_name is None
    assert [r["type"] for r in to_result(t, parse_label_config(plain), 0.5)] == ["textarea", "choices"]


@pytest.mark.slow
def test_words_are_timed_on_real_speech(engine, clip):
    jfk, comfy = engine.transcribe([clip("jfk_en.flac"), clip("comfyui_en.mp3")])
    assert " ".join(w.text for w in jfk.words) == jfk.text
    starts = [w.start for w in jfk.words]
    assert starts == sorted(starts) and all(w.start <= w.end <= jfk.duration + 0.02 for w in jfk.words)
    by_text = {w.text.strip(",."): w for w in jfk.words}
    assert 1.0 <= by_text["fellow"].start <= 2.5  # "And so my fellow Americans" — fellow at about 1.6 s
    assert 9.0 <= by_text["country"].start <= 11.0  # the last word, at the end of the 11 s clip
    misheard = [w for w in comfy.words if w.probability < 0.5 and w.start < 2.5]
    assert misheard, comfy.words  # "ComfyUI" (about 1.2–2.2 s) is heard as something improbable


def test_predictions_label_studio_would_drop_are_fixed_or_reported():
    """Label Studio's bulk import silently drops an invalid prediction; its own validator runs first here."""
    from label_studio_sdk.label_interface import LabelInterface

    from loopscribe.labelstudio import PredictReport, checked_predictions

    interface, config = LabelInterface(CONFIG), parse_label_config(CONFIG)
    t = transcription(words(("Then", 0.9), ("Confu", 0.16), ("folder", 0.9)))
    good = to_result(t, config, 0.5)
    wrong_label = [dict(r, value=dict(r["value"], labels=["Model unsure"])) if r["type"] == "labels" else r
                   for r in good]
    broken = [{"from_name": "transcription", "to_name": "nowhere", "type": "textarea", "value": {"text": ["x"]}}]
    report = PredictReport()
    sent = checked_predictions(interface, [{"task": 1, "result": good}, {"task": 2, "result": wrong_label},
                                           {"task": 3, "result": broken}], report, config.unsure_name)
    assert [p["task"] for p in sent] == [1, 2]
    assert any(r["type"] == "labels" for r in sent[0]["result"])
    assert [r["type"] for r in sent[1]["result"]] == ["textarea", "choices"]  # regions left out, transcript kept
    assert list(report.failed) == [3] and "refuse" in report.failed[3]
