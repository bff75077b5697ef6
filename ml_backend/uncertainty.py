"""Uncertainty signals of one decoded utterance and the single confidence score built from them.

Confidence is what Label Studio's uncertainty sampling sorts by (lowest first), so it has
to rank: it is driven by token entropy (how spread the model's next-token distribution
was) and pushed down by the signs of hallucination that entropy misses — repetition
loops (high gzip compression ratio, long runs of one token) and text over probable
silence (high no-speech probability). See FACTS.md for the measured ranges.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

# Whisper's own fallback thresholds (openai/whisper transcribe.py defaults).
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
MAX_TOKEN_RUN = 5


@dataclass(frozen=True)
class Uncertainty:
    """Signals of one utterance; entropies in nats over the text tokens the decoder chose."""

    mean_entropy: float
    max_entropy: float
    mean_logprob: float
    no_speech_prob: float
    compression_ratio: float
    max_token_run: int
    temperature: float = 0.0
    """Sampling temperature of the kept decode (> 0 means the greedy decode failed the checks)."""

    @property
    def looks_like_repetition(self) -> bool:
        return self.compression_ratio > COMPRESSION_RATIO_THRESHOLD or self.max_token_run > MAX_TOKEN_RUN

    def needs_fallback(self) -> bool:
        """Whisper's rule: re-decode hotter when the text loops or is improbable, unless it is silence."""
        if self.no_speech_prob > NO_SPEECH_THRESHOLD and self.mean_logprob < LOGPROB_THRESHOLD:
            return False
        return self.looks_like_repetition or self.mean_logprob < LOGPROB_THRESHOLD


def compression_ratio(text: str) -> float:
    """gzip ratio of the text: loops compress well (Whisper flags > 2.4)."""
    raw = text.encode("utf-8")
    if not raw:
        return 0.0
    return len(raw) / len(zlib.compress(raw))


def max_run(items: list) -> int:
    """Length of the longest run of one repeated item (token id or word)."""
    best = run = 0
    previous = object()
    for item in items:
        run = run + 1 if item == previous else 1
        best = max(best, run)
        previous = item
    return best


def confidence(u: Uncertainty) -> float:
    """Map signals to [0, 1], higher = surer.

    ``exp(-mean_entropy)`` is the inverse perplexity of the model's own predictive
    distribution (1.0 = every token certain). It is multiplied by the probability that
    the audio holds speech, and by a penalty when the output looks like a loop.
    """
    score = math.exp(-max(u.mean_entropy, 0.0))
    score *= 1.0 - min(max(u.no_speech_prob, 0.0), 1.0)
    if u.compression_ratio > COMPRESSION_RATIO_THRESHOLD:
        score *= (COMPRESSION_RATIO_THRESHOLD / u.compression_ratio) ** 2
    if u.max_token_run > MAX_TOKEN_RUN:
        score *= MAX_TOKEN_RUN / u.max_token_run
    return float(min(max(score, 0.0), 1.0))
