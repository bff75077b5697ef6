"""WER/CER with Whisper-style text normalization (jiwer does the alignment)."""

from __future__ import annotations

import jiwer

from ml_backend.text import CHARACTER_LANGUAGES, normalize

__all__ = ["CHARACTER_LANGUAGES", "normalize", "error_rate", "corpus_error_rate", "utterance_counts"]


def error_rate(references: list[str], hypotheses: list[str], language: str | None = "en") -> float:
    """WER, or CER for languages written without spaces; both after normalization."""
    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    if language in CHARACTER_LANGUAGES:
        refs = [r.replace(" ", "") for r in refs]
        hyps = [h.replace(" ", "") for h in hyps]
        return jiwer.cer(refs, hyps)
    return jiwer.wer(refs, hyps)


def utterance_counts(references: list[str], hypotheses: list[str], languages: list[str]) -> list[tuple[int, int]]:
    """``(errors, reference units)`` per utterance (words, or characters for zh/ja/…), after normalization."""
    counts = []
    for ref, hyp, lang in zip(references, hypotheses, languages):
        r, h = normalize(ref, lang), normalize(hyp, lang)
        if lang in CHARACTER_LANGUAGES:
            r, h = " ".join(r.replace(" ", "")), " ".join(h.replace(" ", ""))
        out = jiwer.process_words(r or "<empty>", h)
        counts.append((out.substitutions + out.deletions + out.insertions, len(r.split()) or 1))
    return counts


def corpus_error_rate(references: list[str], hypotheses: list[str], languages: list[str]) -> float:
    """Errors over reference units across clips (words, or characters for zh/ja/…): one long clip
    counts for its length, and one short clip with a normalization quirk does not dominate."""
    counts = utterance_counts(references, hypotheses, languages)
    return sum(e for e, _ in counts) / max(sum(n for _, n in counts), 1)
