"""Unit tests of the uncertainty signals and the confidence formula (no model)."""

from __future__ import annotations

import math

import torch

from ml_backend.uncertainty import Uncertainty, compression_ratio, confidence, max_run


def signals(**kw) -> Uncertainty:
    base = dict(mean_entropy=0.5, max_entropy=2.0, mean_logprob=-0.2, no_speech_prob=0.02,
                compression_ratio=1.3, max_token_run=1)
    return Uncertainty(**(base | kw))


def test_compression_ratio_flags_loops():
    assert compression_ratio("") == 0.0
    assert compression_ratio("And so my fellow Americans, ask not what your country can do for you.") < 2.4
    assert compression_ratio("Book " * 40) > 2.4


def test_max_run():
    assert max_run([]) == 0
    assert max_run([1, 2, 2, 2, 3]) == 3
    assert max_run("a b b a".split()) == 2


def test_confidence_in_unit_interval_and_monotone_in_entropy():
    values = [confidence(signals(mean_entropy=h)) for h in (0.0, 0.3, 1.0, 2.5, 5.0)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values, reverse=True)
    assert math.isclose(confidence(signals(mean_entropy=0.0, no_speech_prob=0.0)), 1.0)


def test_hallucination_signals_push_confidence_down():
    clean = confidence(signals())
    assert confidence(signals(compression_ratio=4.0)) < clean / 2
    assert confidence(signals(max_token_run=12)) < clean / 2
    assert confidence(signals(no_speech_prob=0.9)) < clean / 5


def test_fallback_rule_matches_whisper():
    assert signals(compression_ratio=3.0).needs_fallback()
    assert signals(mean_logprob=-1.5).needs_fallback()
    assert not signals().needs_fallback()
    # improbable text over probable silence is not retried (it is dropped as silence)
    assert not signals(mean_logprob=-1.5, no_speech_prob=0.9).needs_fallback()


def test_token_entropy_ignores_suppressed_tokens():
    from ml_backend.decode_step import token_entropy

    suppressed = torch.tensor([[0.0, 1.0, -torch.inf, -torch.inf], [2.0, 2.0, 2.0, 2.0]]).log_softmax(-1)
    open_only = torch.tensor([[0.0, 1.0]]).log_softmax(-1)
    h = token_entropy(suppressed)
    assert torch.isfinite(h).all()
    assert torch.allclose(h[0], -(open_only.exp() * open_only).sum())  # as if the suppressed ones did not exist
    assert torch.isclose(h[1], torch.log(torch.tensor(4.0)))  # uniform over 4: log 4
