"""Turn a :class:`Transcription` into Label Studio prediction results for a parsed config."""

from __future__ import annotations

from .label_config import TranscriptionConfig
from .transcription import Transcription


def to_result(t: Transcription, config: TranscriptionConfig) -> list[dict]:
    """Result items: transcript TextArea, language Choices, and per-region segments when configured."""
    items: list[dict] = []
    if config.transcript_name:
        items.append({
            "from_name": config.transcript_name, "to_name": config.audio_name, "type": "textarea",
            "value": {"text": [t.text]},
        })
    if config.language_name and t.language in config.language_values:
        items.append({
            "from_name": config.language_name, "to_name": config.audio_name, "type": "choices",
            "value": {"choices": [config.language_values[t.language]]},
        })
    if config.has_segments:
        for i, s in enumerate(t.segments):
            region = {"id": f"seg{i}", "to_name": config.audio_name, "origin": "prediction"}
            timing = {"start": s.start, "end": s.end, "channel": 0}
            items.append(region | {"from_name": config.segment_labels_name, "type": "labels",
                                   "value": timing | {"labels": [config.segment_label]}})
            items.append(region | {"from_name": config.segment_text_name, "type": "textarea",
                                   "value": timing | {"text": [s.text]}})
    return items


def to_prediction(t: Transcription, config: TranscriptionConfig) -> dict:
    """One /predict item: result, score (= confidence, lower is less sure) and model_version."""
    return {"result": to_result(t, config), "score": round(t.confidence, 6), "model_version": t.model_version}
