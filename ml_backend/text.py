"""Whisper-style text normalization, shared by the corrections ledger and WER evaluation."""

from __future__ import annotations

from functools import lru_cache

# Scripts written without spaces between words: compared and scored by characters.
CHARACTER_LANGUAGES = {"zh", "ja", "th", "lo", "km", "my", "bo", "yue"}


@lru_cache(maxsize=2)
def _normalizer(english: bool):
    from transformers.models.whisper.english_normalizer import (
        BasicTextNormalizer,
        EnglishTextNormalizer,
    )

    return EnglishTextNormalizer({}) if english else BasicTextNormalizer()


def normalize(text: str, language: str | None = "en") -> str:
    """Whisper's English normalizer for English, its basic (lower-case, no punctuation) one otherwise."""
    return " ".join(_normalizer(language == "en")(text or "").split())
