"""The promotion gate: paired bootstrap over held-out utterances, "not enough evidence", general-speech check."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from training import gate


def counts(errors: list[int], words: int = 10) -> list[tuple[int, int]]:
    return [(e, words) for e in errors]


def test_a_clear_improvement_on_many_utterances_is_significant():
    live, cand = counts([3, 4, 2, 5, 3, 4, 3, 2, 4, 3] * 3), counts([1, 2, 1, 2, 1, 3, 1, 1, 2, 1] * 3)
    c = gate.compare(live, cand, confidence=0.95)
    assert c.items == 30 and c.gain == pytest.approx(0.18) and c.improved == 30 and c.worsened == 0
    assert 0 < c.lower <= c.gain <= c.upper and c.p_value < 0.01


def test_the_same_gain_on_few_utterances_is_not_enough_evidence(settings):
    # two utterances improve a lot, two get a little worse: a positive mean gain, but zero inside the interval
    c = gate.compare(counts([6, 6, 1, 1]), counts([1, 2, 2, 2]), confidence=0.95)
    assert c.gain > 0 and c.lower <= 0
    decision = gate.decide(c, settings)
    assert decision.outcome == gate.INCONCLUSIVE and "not enough evidence" in decision.reason
    assert "4 held-out items" in decision.reason


def test_the_rule_in_order(settings):
    better = gate.compare(counts([3] * 20), counts([1] * 20))
    assert gate.decide(gate.compare(counts([2] * 5), counts([2] * 5)), settings).outcome == gate.REJECT  # equal
    assert gate.decide(gate.compare(counts([1] * 5), counts([2] * 5)), settings).outcome == gate.REJECT  # worse
    tiny = replace(settings, promote_min_gain=0.5)
    assert "PROMOTE_MIN_GAIN" in gate.decide(better, tiny).reason
    worse_general = gate.RegressionCheck(items=6, live_error=0.049, candidate_error=0.056, margin=0.005)
    decision = gate.decide(better, settings, worse_general)
    assert decision.outcome == gate.REJECT and "general speech 0.049 → 0.056" in decision.reason
    fine_general = gate.RegressionCheck(items=6, live_error=0.049, candidate_error=0.052, margin=0.005)
    decision = gate.decide(better, settings, fine_general)
    assert decision.outcome == gate.PROMOTE and "within the 0.005 margin" in decision.reason
    assert gate.decide(better, settings).outcome == gate.PROMOTE  # no regression set configured


def test_the_bootstrap_is_reproducible():
    live, cand = counts([3, 1, 4, 1, 5, 9, 2, 6]), counts([2, 1, 3, 1, 4, 8, 2, 5])
    assert gate.compare(live, cand) == gate.compare(live, cand)


def test_regression_clips_come_from_a_transcripts_file(tmp_path, settings):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "transcripts.json").write_text(json.dumps({
        "a.wav": {"text": "hello", "language": "en"},
        "missing.wav": {"text": "gone", "language": "en"},
        "stereo.wav": {"segments": [{"text": "x"}]},
    }))
    clips = gate.regression_clips(replace(settings, regression_audio=str(tmp_path)))
    assert clips == [(tmp_path / "a.wav", "hello", "en")]
    assert gate.regression_clips(replace(settings, regression_audio="")) == []
    other = tmp_path / "fr"
    other.mkdir()
    (other / "b.wav").write_bytes(b"RIFF")
    (other / "transcripts.json").write_text(json.dumps({"b.wav": {"text": "bonjour", "language": "fr"}}))
    both = replace(settings, regression_audio=f"{tmp_path}, {other},/nowhere")  # several folders, one missing
    assert [c[1] for c in gate.regression_clips(both)] == ["hello", "bonjour"]
    assert [c[1] for c in gate.regression_clips(both, ["fr"])] == ["bonjour"]  # a French project's check


def test_the_bundled_regression_set_is_real_english_speech_with_transcripts(settings):
    from loopscribe.paths import REGRESSION_EN, default_regression_audio

    clips = gate.regression_clips(replace(settings, regression_audio=str(REGRESSION_EN)))
    assert len(clips) == 32 and {c[2] for c in clips} == {"en"} and all(len(c[1].split()) >= 3 for c in clips)
    assert str(REGRESSION_EN) in default_regression_audio().split(",")


def test_the_gate_transcribes_as_the_project_is_served():
    from training.pipeline import gate_options

    assert gate_options(["en"]).language == "en" and not gate_options(["en"]).word_timestamps  # forced
    assert gate_options(["en", "de"]).languages == ("de", "en") and gate_options(["en", "de"]).language is None
    assert gate_options([]).language is None and gate_options([]).languages is None  # any language, detected
