"""Clips with reference transcripts: the real recordings in ``shared/audio`` plus espeak-ng sentences."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .synth import SENTENCES, have_espeak, sentence_clips

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_audio_dir() -> Path:
    """``LOOPSCRIBE_SHARED_AUDIO``, else ``shared/audio`` beside the checkout."""
    return Path(os.environ.get("LOOPSCRIBE_SHARED_AUDIO") or REPO_ROOT.parent / "shared" / "audio")


@dataclass(frozen=True)
class ReferenceClip:
    path: Path
    text: str
    language: str  # the main language; bilingual files carry several segments


def shared_clips(root: Path | None = None) -> list[ReferenceClip]:
    """Recordings listed in ``root/transcripts.json`` (default: the shared real recordings) with one
    reference text each (a stereo clip with one text per channel is left out)."""
    root = root or shared_audio_dir()
    meta_file = root / "transcripts.json"
    if not meta_file.is_file():
        return []
    clips = []
    for name, meta in json.loads(meta_file.read_text()).items():
        if "text" in meta:
            clips.append(ReferenceClip(root / name, meta["text"], meta["language"]))
        elif "segments" in meta:
            text = " ".join(s["text"] for s in meta["segments"])
            clips.append(ReferenceClip(root / name, text, meta["segments"][0]["language"]))
    return clips


def espeak_clips(cache_dir: Path, per_language: int = 2) -> list[ReferenceClip]:
    if not have_espeak():
        return []
    return [
        ReferenceClip(c.path, c.text, c.language)
        for c in sentence_clips(cache_dir, list(SENTENCES), per_language=per_language)
    ]
