"""Turn a :class:`Transcription` into Label Studio prediction results for a parsed config."""

from __future__ import annotations

from .alignment import unsure_stretches
from .label_config import TranscriptionConfig
from .transcription import Transcription


def to_result(t: Transcription, config: TranscriptionConfig, unsure_below: float = 0.0) -> list[dict]:
    """Result items: transcript TextArea, language Choices, per-region segments when configured, and a region
    on every stretch of words less probable than ``unsure_below`` when the config has an "unsure" Label."""
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
    if config.unsure_name and config.unsure_label and unsure_below > 0:
        for i, (start, end, _words) in enumerate(unsure_stretches(t.words, unsure_below)):
            items.append({"id": f"unsure{i}", "from_name": config.unsure_name, "to_name": config.audio_name,
                          "type": "labels", "origin": "prediction",
                          "value": {"start": start, "end": max(end, start + 0.1), "channel": 0,
                                    "labels": [config.unsure_label]}})
    return items


def to_prediction(t: Transcription, config: TranscriptionConfig, unsure_below: float = 0.0,
                  score: float | None = None) -> dict:
    """One /predict item: result, score (what Label Studio ranks by, lowest first: the confidence, or the
    held-out split's :func:`~ml_backend.splits.serving_score`) and model_version."""
    return {"result": to_result(t, config, unsure_below),
            "score": round(t.confidence if score is None else score, 9), "model_version": t.model_version}
