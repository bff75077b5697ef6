"""Read what a project's labeling config asks for, by tag type, not by hard-coded names."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import ConfigurationError

AUDIO_TAGS = {"audio", "audioplus"}
UNSURE = "unsure"  # the alias (or value) of the Label that marks where the model is unsure


class LabelConfigError(ConfigurationError):
    """The labeling config cannot hold Whisper predictions (says what is missing)."""


@dataclass(frozen=True)
class TranscriptionConfig:
    audio_name: str  # the Audio tag's name (the to_name of every result)
    audio_key: str  # the task data key the Audio tag reads ($audio → "audio")
    transcript_name: str | None  # a whole-clip TextArea
    language_name: str | None = None  # a Choices over language codes
    language_values: dict[str, str] = field(default_factory=dict)  # code → value stored in results
    segment_labels_name: str | None = None  # Labels for per-region segments
    segment_label: str | None = None
    segment_text_name: str | None = None  # perRegion TextArea
    unsure_name: str | None = None  # Labels for the stretches the model is least sure of (a Label aliased "unsure")
    unsure_label: str | None = None  # as results store it: the Label's alias, else its value

    @property
    def has_segments(self) -> bool:
        return bool(self.segment_labels_name and self.segment_text_name)


def _targets(tag: ET.Element, audio_name: str) -> bool:
    return audio_name in (tag.get("toName") or "").split(",")


def _true(value: str | None) -> bool:
    return (value or "").lower() in {"true", "1", "yes"}


@lru_cache(maxsize=64)
def parse_label_config(xml: str) -> TranscriptionConfig:
    """Find the Audio tag and the TextArea / Choices / Labels that annotate it."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc
    tags = list(root.iter())
    audio = next((t for t in tags if t.tag.lower() in AUDIO_TAGS and t.get("name")), None)
    if audio is None or not (audio.get("value") or "").startswith("$"):
        raise LabelConfigError('label config needs an <Audio name="..." value="$key"/> tag')
    audio_name, audio_key = audio.get("name") or "", (audio.get("value") or "$")[1:]

    whole_text = region_text = None
    for t in tags:
        if t.tag == "TextArea" and _targets(t, audio_name):
            if _true(t.get("perRegion")):
                region_text = region_text or t.get("name")
            else:
                whole_text = whole_text or t.get("name")

    language_name, language_values = None, {}
    for t in tags:
        if t.tag != "Choices" or not _targets(t, audio_name) or _true(t.get("perRegion")):
            continue
        values = {}
        for choice in t.iter("Choice"):
            stored = choice.get("alias") or choice.get("value") or ""
            code = stored if len(stored) <= 3 else _code_in_parentheses(choice.get("value") or "")
            if code:
                values[code.lower()] = stored
        named_language = (t.get("name") or "").lower().startswith("lang")
        if values and (named_language or (len(values) >= 2 and "en" in values)):
            language_name, language_values = t.get("name"), values
            break

    def marks_unsure(t: ET.Element) -> bool:
        return any(UNSURE in ((label.get("alias") or "").lower(), (label.get("value") or "").lower())
                   for label in t.iter("Label"))

    audio_labels = [t for t in tags if t.tag == "Labels" and _targets(t, audio_name)]
    unsure = next((t for t in audio_labels if marks_unsure(t)), None)
    unsure_label = next((label.get("alias") or label.get("value") for label in unsure.iter("Label")
                         if UNSURE in ((label.get("alias") or "").lower(), (label.get("value") or "").lower())),
                        None) if unsure is not None else None
    labels = next((t for t in audio_labels if t is not unsure), None)
    segment_label = None
    if labels is not None:
        first = next(labels.iter("Label"), None)
        segment_label = first.get("value") if first is not None else None

    config = TranscriptionConfig(
        audio_name=audio_name,
        audio_key=audio_key,
        transcript_name=whole_text,
        language_name=language_name,
        language_values=language_values,
        segment_labels_name=labels.get("name") if labels is not None and region_text else None,
        segment_label=segment_label,
        segment_text_name=region_text if labels is not None else None,
        unsure_name=unsure.get("name") if unsure is not None else None,
        unsure_label=unsure_label,
    )
    if not config.transcript_name and not config.has_segments:
        raise LabelConfigError(
            f'label config needs a <TextArea toName="{audio_name}"/> for the transcript '
            f'(or <Labels> with a perRegion TextArea for segments)'
        )
    return config


def restrict_languages(xml: str, codes: Sequence[str]) -> str:
    """``xml`` with its language Choices cut down to ``codes`` (in the config's order), for a project whose
    recordings are in those languages only: the backend then never predicts another (one code: no detection).

    Edits the text, so comments and layout survive; raises :class:`LabelConfigError` for a code the config
    does not offer.
    """
    config = parse_label_config(xml)
    wanted = [c.strip().lower() for c in codes if c.strip()]
    missing = [c for c in wanted if c not in config.language_values]
    if not config.language_name or not wanted or missing:
        raise LabelConfigError(f"the label config offers no language choice for {', '.join(missing or wanted)!r}"
                               if config.language_name else "the label config has no language Choices")
    opening = re.search(rf'<Choices\b[^>]*\bname="{re.escape(config.language_name)}"[^>]*>', xml)
    assert opening is not None  # parse_label_config found it
    end = xml.index("</Choices>", opening.end())

    def keep(choice: re.Match) -> str:
        tag = choice.group(0)
        stored = re.search(r'\balias="([^"]*)"', tag) or re.search(r'\bvalue="([^"]*)"', tag)
        value = stored.group(1) if stored else ""
        code = value if len(value) <= 3 else _code_in_parentheses(value)
        return tag if (code or "").lower() in wanted else ""

    block = re.sub(r"[ \t]*<Choice\b[^>]*/>[ \t]*\n?", keep, xml[opening.end():end])
    restricted = xml[:opening.end()] + block + xml[end:]
    assert set(parse_label_config(restricted).language_values) == set(wanted)
    return restricted


def _code_in_parentheses(value: str) -> str | None:
    """'English (en)' → 'en'."""
    if value.endswith(")") and "(" in value:
        code = value[value.rindex("(") + 1 : -1]
        return code if 2 <= len(code) <= 3 else None
    return None
