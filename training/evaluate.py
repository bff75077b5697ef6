"""Held-out evaluation: WER (CER for languages without spaces) after Whisper normalization."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from ml_backend.text import CHARACTER_LANGUAGES
from ml_backend.transcription import TranscribeOptions, Transcriber

from .dataset import Example
from .metrics import corpus_error_rate, utterance_counts


@dataclass(frozen=True)
class EvalReport:
    model_version: str
    items: int
    error_rate: float  # words, or characters for zh/ja/…, over the whole split: the gate compares this
    wer: float | None  # languages written with spaces
    cer: float | None  # languages written without
    by_language: dict[str, float] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # task, reference, hypothesis, languages

    def to_dict(self) -> dict:
        return asdict(self)

    def counts(self) -> list[tuple[int, int]]:
        """``(errors, reference units)`` per utterance, in order: what the gate's paired test compares."""
        rows = self.examples
        return utterance_counts([r["reference"] for r in rows], [r["hypothesis"] for r in rows],
                                [r["language"] for r in rows])


def evaluate(engine: Transcriber, examples: Sequence[Example],
             options: TranscribeOptions = TranscribeOptions(word_timestamps=False)) -> EvalReport:
    """Transcribe the held-out clips as serving would (language detected, unless ``options`` force one)
    and score against annotations."""
    clips = [e.audio for e in examples]
    hyps = engine.transcribe(clips, options) if clips else []
    refs = [e.text for e in examples]
    langs = [e.language or h.language for e, h in zip(examples, hyps)]
    texts = [h.text for h in hyps]

    def subset(pick) -> float | None:
        idx = [i for i, lang in enumerate(langs) if pick(lang)]
        if not idx:
            return None
        return corpus_error_rate([refs[i] for i in idx], [texts[i] for i in idx], [langs[i] for i in idx])

    by_language = {lang: subset(lambda x, lang=lang: x == lang) for lang in sorted(set(langs))}
    return EvalReport(
        model_version=engine.model_version,
        items=len(examples),
        error_rate=corpus_error_rate(refs, texts, langs) if examples else float("nan"),
        wer=subset(lambda x: x not in CHARACTER_LANGUAGES),
        cer=subset(lambda x: x in CHARACTER_LANGUAGES),
        by_language={k: v for k, v in by_language.items() if v is not None},
        examples=[{"task": e.task, "reference": r, "hypothesis": h.text, "language": lang,
                   "detected_language": h.language} for e, r, h, lang in zip(examples, refs, hyps, langs)],
    )
