"""Read a transcript and a language back out of Label Studio results (annotations or predictions).

The inverse of :mod:`ml_backend.predictions`: the project's parsed config says which
TextArea holds the transcript and which Choices the language; without a config the
first whole-clip TextArea and the first Choices are used.
"""

from __future__ import annotations

from dataclasses import dataclass

from .label_config import TranscriptionConfig
from .text import normalize


@dataclass(frozen=True)
class Labeled:
    text: str
    language: str | None

    def same_as(self, other: Labeled) -> bool:
        """Equal after Whisper normalization (so casing and punctuation edits are not corrections)."""
        lang = self.language or other.language
        return self.language == other.language and normalize(self.text, lang) == normalize(other.text, lang)


def _texts(item: dict) -> list[str]:
    return [t for t in (item.get("value") or {}).get("text") or [] if isinstance(t, str)]


def extract(result: list[dict] | None, config: TranscriptionConfig | None = None) -> Labeled:
    """Transcript (whole-clip TextArea, else per-region texts in time order) and language code."""
    result = [r for r in result or [] if isinstance(r, dict)]
    whole = [r for r in result if r.get("type") == "textarea" and "start" not in (r.get("value") or {})]
    if config is not None and config.transcript_name:
        whole = [r for r in whole if r.get("from_name") == config.transcript_name]
    if whole:
        text = " ".join(" ".join(_texts(r)) for r in whole)
    else:
        regions = [r for r in result if r.get("type") == "textarea" and "start" in (r.get("value") or {})]
        if config is not None and config.segment_text_name:
            regions = [r for r in regions if r.get("from_name") == config.segment_text_name]
        regions.sort(key=lambda r: float(r["value"].get("start") or 0.0))
        text = " ".join(" ".join(_texts(r)) for r in regions)

    language = None
    choices = [r for r in result if r.get("type") == "choices"]
    if config is not None and config.language_name:
        choices = [r for r in choices if r.get("from_name") == config.language_name]
    stored_to_code = {v: k for k, v in (config.language_values if config else {}).items()}
    for item in choices:
        picked = (item.get("value") or {}).get("choices") or []
        if picked:
            value = str(picked[0])
            language = stored_to_code.get(value, value.lower() if len(value) <= 3 else None)
            if language:
                break
    return Labeled(" ".join(text.split()), language)


def classify(human: Labeled, predicted: Labeled | None) -> str:
    """``correction`` when the human result adds information (differs from the prediction, or had none),
    ``verified`` when it accepts the prediction unchanged (after normalization)."""
    if predicted is None:
        return "correction" if human.text else "verified"  # written from scratch: new information
    same = human.same_as(Labeled(predicted.text, predicted.language or human.language))
    return "verified" if same else "correction"
