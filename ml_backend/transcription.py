"""What transcribing gives and takes: options, typed results, and the :class:`Transcriber` protocol.

Serving, bulk pre-annotation and evaluation depend on this protocol, not on an engine class:
:class:`~ml_backend.engine.WhisperEngine` implements it, and so can a test's stand-in.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from .errors import ConfigurationError
from .uncertainty import Uncertainty


@dataclass(frozen=True)
class TranscribeOptions:
    task: str = "transcribe"
    """``transcribe`` keeps the spoken language; ``translate`` writes English."""
    language: str | None = None
    """Force this language code for every window; ``None`` detects it per window."""
    languages: tuple[str, ...] | None = None
    """Detect only among these (a project's languages); a single one is forced, no detection."""
    timestamps: bool = True
    """Predict segment timestamps (costs two tokens per segment)."""
    word_timestamps: bool = True
    """Time every word from cross-attention (one extra decoder pass per window) and give it a probability."""
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    """Greedy first; hotter sampling only for windows that loop or are improbable (Whisper's fallback)."""

    def __post_init__(self) -> None:
        if self.task not in ("transcribe", "translate"):
            raise ConfigurationError(f"task must be 'transcribe' or 'translate', not {self.task!r}")
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        for code in (self.language, *(self.languages or ())):
            if code is not None and code not in LANGUAGES:
                raise ConfigurationError(f"unknown language {code!r} (Whisper's codes: en, de, zh, …)")

    @classmethod
    def for_project(cls, languages: Collection[str]) -> TranscribeOptions:
        """Options for a project whose label config lists ``languages`` (empty: any language)."""
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        known = tuple(sorted(c for c in languages if c in LANGUAGES))
        if len(known) == 1:
            return cls(language=known[0])
        return cls(languages=known or None)


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    language: str


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str
    probability: float  # product of its tokens' probabilities under the decoder


@dataclass(frozen=True)
class Transcription:
    """One clip's transcript; ``words`` (with timings and probabilities) when word timestamps were asked for."""

    text: str
    language: str
    language_probability: float
    confidence: float
    duration: float
    segments: tuple[Segment, ...]
    uncertainty: Uncertainty
    model_version: str
    words: tuple[Word, ...] = ()

    @property
    def languages(self) -> list[str]:
        """Languages in order of first appearance (a bilingual file lists both)."""
        seen: dict[str, None] = {}
        for s in self.segments:
            seen.setdefault(s.language, None)
        return list(seen) or [self.language]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segments"] = [asdict(s) for s in self.segments]
        d["words"] = [asdict(w) for w in self.words]
        d["languages"] = self.languages
        return d


class Transcriber(Protocol):
    """A speech-to-text engine as the backend, the worker and evaluation use it."""

    @property
    def model_version(self) -> str: ...

    def transcribe(self, clips: Sequence[np.ndarray], options: TranscribeOptions = ..., *,
                   on_batch: Callable[[int], None] | None = None) -> list[Transcription]: ...
