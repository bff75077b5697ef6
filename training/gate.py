"""The promotion gate: a candidate goes live only when it is better, knowably so, and no worse on general speech.

Held-out utterances are scored for both models, utterance by utterance, and compared by a
paired bootstrap: resample the utterances (with replacement), recompute both corpus error
rates on the same resample, and look at the gain (live − candidate). The candidate is
promoted when the gain's lower bound at ``PROMOTE_CONFIDENCE`` (one-sided) is above zero,
the gain itself is at least ``PROMOTE_MIN_GAIN``, and a general-speech regression set (real
recordings with transcripts, ``REGRESSION_AUDIO``) does not get worse by more than
``REGRESSION_MAX_INCREASE``. A candidate that looks better but whose interval still holds zero
is *inconclusive* ("not enough evidence"), never promoted. Every outcome says how many
utterances it rests on.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ml_backend.settings import Settings

PROMOTE, REJECT, INCONCLUSIVE = "promoted", "rejected", "inconclusive"
RESAMPLES = 2000


@dataclass(frozen=True)
class Comparison:
    """Live model vs candidate on the same utterances (errors and reference words per utterance)."""

    items: int
    live_error: float
    candidate_error: float
    gain: float  # live − candidate: positive means the candidate makes fewer errors
    lower: float  # the gain's one-sided lower bound at `confidence`
    upper: float  # … and its upper bound (the two make a central interval at 2·confidence − 1)
    p_value: float  # share of resamples in which the candidate is not better
    confidence: float
    improved: int  # utterances with fewer errors under the candidate
    worsened: int

    def describe(self, what: str = "held-out items") -> str:
        """In words; ``what`` names what was compared (the gate's held-out tasks, or another set)."""
        return (f"gain {self.gain:+.3f} ({self.live_error:.3f} → {self.candidate_error:.3f}), "
                f"{self.confidence:.0%} lower bound {self.lower:+.3f}, p {self.p_value:.3f}, "
                f"{self.items} {what} ({self.improved} better, {self.worsened} worse)")


def compare(live: list[tuple[int, int]], candidate: list[tuple[int, int]], confidence: float = 0.95,
            resamples: int = RESAMPLES, seed: int = 0) -> Comparison:
    """Paired bootstrap over utterances; each item is ``(errors, reference units)`` for one utterance."""
    if len(live) != len(candidate) or not live:
        raise ValueError("compare needs the same, non-empty list of utterances for both models")
    e_live = np.array([e for e, _ in live], dtype=float)
    e_cand = np.array([e for e, _ in candidate], dtype=float)
    units = np.array([max(n, 1) for _, n in live], dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(live), size=(resamples, len(live)))
    totals = units[picks].sum(axis=1)
    gains = (e_live[picks].sum(axis=1) - e_cand[picks].sum(axis=1)) / totals
    gain = float((e_live.sum() - e_cand.sum()) / units.sum())
    return Comparison(
        items=len(live), live_error=float(e_live.sum() / units.sum()),
        candidate_error=float(e_cand.sum() / units.sum()), gain=gain,
        lower=float(np.quantile(gains, 1 - confidence)), upper=float(np.quantile(gains, confidence)),
        p_value=float(np.mean(gains <= 0)), confidence=confidence,
        improved=int(np.sum(e_cand < e_live)), worsened=int(np.sum(e_cand > e_live)),
    )


@dataclass(frozen=True)
class RegressionCheck:
    """General speech, before and after: the candidate may not get worse by more than the margin.

    The rule is on the measured rise itself (do no harm: a rise over the margin is not given the benefit of the
    doubt); ``interval`` says how much of it a few dozen recordings can tell apart from noise.
    """

    items: int
    live_error: float
    candidate_error: float
    margin: float
    interval: tuple[float, float] | None = None  # the rise's central 90 % interval (paired bootstrap)

    @property
    def increase(self) -> float:
        return self.candidate_error - self.live_error

    @property
    def passed(self) -> bool:
        return self.increase <= self.margin

    def describe(self) -> str:
        noise = (f", rise {self.increase:+.3f} in [{self.interval[0]:+.3f}, {self.interval[1]:+.3f}] at 90 %"
                 if self.interval else "")
        return (f"general speech {self.live_error:.3f} → {self.candidate_error:.3f} on {self.items} recordings"
                f"{noise} ({'within' if self.passed else 'over'} the {self.margin:.3f} margin)")

    @classmethod
    def from_counts(cls, live: list[tuple[int, int]], candidate: list[tuple[int, int]],
                    margin: float) -> RegressionCheck:
        """From per-recording ``(errors, reference units)`` of both models."""
        paired = compare(live, candidate, confidence=0.95)  # gain = live − candidate: the rise is its negative
        return cls(paired.items, paired.live_error, paired.candidate_error, margin,
                   (-paired.upper, -paired.lower))


@dataclass(frozen=True)
class Decision:
    outcome: str  # PROMOTE | REJECT | INCONCLUSIVE
    reason: str
    comparison: Comparison
    regression: RegressionCheck | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def decide(comparison: Comparison, settings: Settings, regression: RegressionCheck | None = None) -> Decision:
    """The gate's rule, in order: better at all, knowably better, better by enough, no worse on general speech."""
    held = comparison.describe()
    if comparison.gain <= 0:
        return Decision(REJECT, f"not better: {held}", comparison, regression)
    if comparison.lower <= 0:
        return Decision(INCONCLUSIVE, f"not enough evidence: {held}", comparison, regression)
    if comparison.gain < settings.promote_min_gain:
        return Decision(REJECT, f"gain below PROMOTE_MIN_GAIN {settings.promote_min_gain}: {held}", comparison,
                        regression)
    if regression is not None and not regression.passed:
        return Decision(REJECT, f"worse on general speech: {regression.describe()}; {held}", comparison, regression)
    checked = regression.describe() if regression is not None else "no regression set (REGRESSION_AUDIO)"
    return Decision(PROMOTE, f"{held}; {checked}", comparison, regression)


def regression_clips(settings: Settings, languages: Collection[str] | None = None) -> list[tuple[Path, str, str]]:
    """``(path, text, language)`` of the regression set: each ``REGRESSION_AUDIO`` folder's ``transcripts.json``
    (``{"file": {"text": ..., "language": ...}}``); none when it is not set or not there. ``languages``: only
    recordings in those (a project's languages), all when None or empty."""
    clips = []
    for folder in filter(None, (f.strip() for f in settings.regression_audio.split(","))):
        root = Path(folder).expanduser()
        if not (root / "transcripts.json").is_file():
            continue
        for name, meta in json.loads((root / "transcripts.json").read_text()).items():
            if isinstance(meta, dict) and isinstance(meta.get("text"), str) and (root / name).is_file():
                language = str(meta.get("language") or "en")
                if not languages or language in languages:
                    clips.append((root / name, meta["text"], language))
    return clips
