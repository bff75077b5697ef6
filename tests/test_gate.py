"""The promotion gate: paired bootstrap over held-out utterances, "not enough evidence", general-speech check."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

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


def test_the_general_speech_check_says_how_noisy_its_rise_is():
    # 35 recordings of 16 words: six get one word worse, three one word better: a 0.54-point rise, over the margin,
    # whose interval still reaches zero
    live, cand = counts([1] * 35, 16), counts([2] * 6 + [0] * 3 + [1] * 26, 16)
    check = gate.RegressionCheck.from_counts(live, cand, margin=0.005)
    assert check.items == 35 and check.increase == pytest.approx(3 / 560) and not check.passed
    low, high = check.interval
    assert low <= 0 < check.increase < high
    assert f"rise +0.005 in [{low:+.3f}, {high:+.3f}] at 90 %" in check.describe()
    assert "over the 0.005 margin" in check.describe()
    same = gate.RegressionCheck.from_counts(live, live, margin=0.005)
    assert same.passed and same.interval == (0.0, 0.0)


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


def test_a_shrunk_adapter_is_the_trained_update_scaled(tmp_path):
    """``scale_adapter`` on a real peft adapter: loaded back by peft, its weight update is exactly ``strength`` times
    the trained one, and nothing else changes."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from training.lora import scale_adapter

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        module = torch.nn.Module()
        module.q_proj = torch.nn.Linear(4, 4)
        module.v_proj = torch.nn.Linear(4, 4)
        return module

    trained = get_peft_model(fresh(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()  # as if trained: peft starts B at zero
    trained.save_pretrained(tmp_path / "adapter")
    scale_adapter(tmp_path / "adapter", tmp_path / "half", 0.5)
    assert (tmp_path / "half" / "adapter_config.json").read_text() == (
        tmp_path / "adapter" / "adapter_config.json").read_text()

    def update(adapter: str) -> torch.Tensor:
        merged = PeftModel.from_pretrained(fresh(), adapter).merge_and_unload()
        weight = "q_proj.weight"
        return dict(merged.named_parameters())[weight] - dict(fresh().named_parameters())[weight]

    full, half = update(str(tmp_path / "adapter")), update(str(tmp_path / "half"))
    assert full.abs().sum() > 0 and torch.allclose(half, 0.5 * full, atol=1e-6)
    with pytest.raises(ValueError, match="strength"):
        scale_adapter(tmp_path / "adapter", tmp_path / "none", 0.0)


WORDS = "apple river stone cloud maple garden silver window orange yellow".split()


class _Engine:
    """A stand-in for the Whisper engine in the gate's unit tests: held-out errors per utterance and general-speech
    error follow the strength of its adapter (the mean of the adapter's ``lora_B``; no adapter: the live model)."""

    errors_at_full_strength = 1  # the live model makes 3 per utterance
    general_increase = 0.008  # at full strength; the margin is 0.005

    def __init__(self, settings, model: str | None = None, *, resolved=None):
        from safetensors.torch import load_file

        self.model_version = resolved.version if resolved else "live"
        weights = load_file(str(Path(resolved.adapter) / "adapter_model.safetensors")) if resolved else {}
        self.strength = float(next((v.mean() for k, v in weights.items() if "lora_B" in k), 0.0))

    def transcribe(self, clips, options=None):
        from types import SimpleNamespace

        wrong = round(3 - (3 - self.errors_at_full_strength) * self.strength)
        text = " ".join(["x"] * wrong + WORDS[wrong:])
        return [SimpleNamespace(text=text, language="en") for _ in clips]


@pytest.fixture
def fake_gate(tmp_path, monkeypatch, settings):
    """(judge's arguments, a candidate whose adapter is at strength 1) with the engine and general speech faked."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import ml_backend.engine
    from ml_backend.model_store import resolve_base
    from training import pipeline
    from training.dataset import Example

    monkeypatch.setattr(ml_backend.engine, "WhisperEngine", _Engine)
    monkeypatch.setattr(pipeline, "regression_check", lambda s, live, cand, options: gate.RegressionCheck(
        32, 0.05, 0.05 + cand.strength * _Engine.general_increase, s.regression_max_increase))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    save_file({"m.q_proj.lora_A.weight": torch.ones(2, 4), "m.q_proj.lora_B.weight": torch.ones(4, 2)},
              str(adapter / "adapter_model.safetensors"))
    candidate = replace(resolve_base(settings), version="cand", adapter=str(adapter))
    heldout = [Example(i, np.zeros(160, dtype=np.float32), " ".join(WORDS), "en") for i in range(20)]
    return pipeline, candidate, heldout, tmp_path / "work"


def test_a_candidate_worse_only_on_general_speech_is_tried_at_half_strength(fake_gate, settings):
    pipeline, candidate, heldout, work = fake_gate
    verdict = pipeline.judge(settings, _Engine(settings), candidate, heldout, pipeline.gate_options(["en"]), work)
    assert verdict.decision.outcome == gate.PROMOTE and verdict.strength == 0.5 and verdict.retried
    assert verdict.candidate.version == "cand-x0.5" and verdict.engine.strength == 0.5
    assert verdict.full_strength.outcome == gate.REJECT and "general speech" in verdict.full_strength.reason
    assert verdict.decision.reason.startswith("at strength 0.5 (as trained it was worse on general speech")
    assert verdict.after.error_rate == pytest.approx(0.2) and verdict.before.error_rate == pytest.approx(0.3)


def test_a_shrunk_candidate_still_passes_the_whole_gate_or_the_trained_one_is_rejected(fake_gate, settings,
                                                                                          monkeypatch):
    pipeline, candidate, heldout, work = fake_gate
    options = pipeline.gate_options(["en"])
    monkeypatch.setattr(_Engine, "general_increase", 0.02)  # half strength is still 1 point worse
    verdict = pipeline.judge(settings, _Engine(settings), candidate, heldout, options, work)
    assert verdict.decision.outcome == gate.REJECT and verdict.strength == 1 and verdict.retried
    assert verdict.candidate.version == "cand"
    assert "; at strength 0.5: worse on general speech" in verdict.decision.reason
    monkeypatch.setattr(_Engine, "general_increase", 0.008)
    off = pipeline.judge(replace(settings, regression_retry_strength=1.0), _Engine(settings), candidate, heldout,
                         options, work)
    assert off.decision.outcome == gate.REJECT and not off.retried  # REGRESSION_RETRY_STRENGTH=1: no retry
    monkeypatch.setattr(_Engine, "errors_at_full_strength", 4)  # worse on the project itself: nothing to shrink
    worse = pipeline.judge(settings, _Engine(settings), candidate, heldout, options, work)
    assert worse.decision.outcome == gate.REJECT and not worse.retried and worse.decision.regression is None


def test_the_retry_strength_is_a_fraction(monkeypatch):
    from ml_backend.errors import ConfigurationError
    from ml_backend.settings import Settings

    for bad in ("0", "1.5", "-0.5", "half"):
        monkeypatch.setenv("REGRESSION_RETRY_STRENGTH", bad)
        with pytest.raises(ConfigurationError, match="REGRESSION_RETRY_STRENGTH"):
            Settings.from_env()
    monkeypatch.setenv("REGRESSION_RETRY_STRENGTH", "0.25")
    assert Settings.from_env().regression_retry_strength == 0.25
