"""Synthetic speech made for benchmarks and learning tests: sentences around a made-up vocabulary.

Base Whisper has never heard these words, so it misspells them until corrections teach it;
the retraining tests and the learning benchmark use them. Demo speech is in :mod:`loopscribe.demo`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from ..demo import (
    SENTENCES,
    ReferenceClip,
    SynthClip,
    have_espeak,
    load,
    sentence_clips,
    speak,
    with_noise,
    write_wav,
)


def espeak_clips(cache_dir: Path, per_language: int = 2) -> list[ReferenceClip]:
    """The demo's espeak-ng sentences, ``per_language`` of each language (none without espeak-ng)."""
    if not have_espeak():
        return []
    return sentence_clips(cache_dir, list(SENTENCES), per_language=per_language)


# A made-up product vocabulary: words base Whisper has never seen, so it misspells them
# until corrections teach it (the retraining tests and the learning benchmark use these).
VOCABULARY = ["Zorvex", "Quintaro", "Blendrix", "Vexaloom", "Trundlepy", "Kavoria"]
TEMPLATES = [
    "Please open the {} dashboard.",
    "The {} update is ready now.",
    "We installed {} on every server.",
    "Send the report to the {} team.",
    "Restart {} before the meeting.",
    "My favourite tool is {}.",
    "Can you check the {} logs today?",
    "The new {} release fixes the bug.",
    "Our customers love the {} app.",
    "Is {} running on the test machine?",
    "I will ask the {} support desk.",
    "The {} license expires next month.",
    "Please add {} to the shopping list.",
    "Yesterday {} crashed twice.",
    "The {} meeting moved to Friday.",
    "Download {} from the intranet.",
]
VOICES: list[dict[str, Any]] = [
    dict(speed=150, pitch=50), dict(speed=130, pitch=35), dict(speed=170, pitch=65), dict(speed=140, pitch=45),
]


def template_of(index: int) -> int:
    """Which of :data:`TEMPLATES` vocabulary sentence ``index`` uses (each word once per template)."""
    return (index // len(VOCABULARY)) % len(TEMPLATES)


def vocabulary_clips(out_dir: Path, count: int = 24, offset: int = 0) -> list[SynthClip]:
    """English sentences built around :data:`VOCABULARY` in varied voices, deterministic by index."""
    clips = []
    for i in range(offset, offset + count):
        word = VOCABULARY[i % len(VOCABULARY)]
        text = TEMPLATES[template_of(i)].format(word)
        voice = dict(VOICES[i % len(VOICES)])
        voice["speed"] += 6 * (i // (len(VOCABULARY) * len(TEMPLATES)))  # past every sentence once: new pace
        tag = hashlib.sha1(f"{text}|{sorted(voice.items())}".encode()).hexdigest()[:8]  # stale cache never matches
        path = out_dir / f"vocab_{i:03d}_{tag}.wav"
        if not path.exists():
            speak(text, "en", path, **voice)
        clips.append(SynthClip(path, text, "en"))
    return clips


# Recording conditions the domain clips cycle through: a domain word is only learnable from audio
# that still carries it, so noise stays at or above 10 dB here (the hopeless cases are separate).
CONDITIONS: list[tuple[str, dict[str, Any], float | None]] = [
    ("clean", {}, None), ("snr15", {}, 15.0), ("fast", dict(speed=205), None), ("snr10", {}, 10.0),
]


def domain_clips(out_dir: Path, count: int, offset: int = 0) -> list[SynthClip]:
    """:func:`vocabulary_clips` sentences recorded in varied conditions (clean, noisy, fast), deterministic."""
    clean = vocabulary_clips(out_dir / "clean", count, offset)
    clips = []
    for i, clip in zip(range(offset, offset + count), clean):
        name, voice, snr = CONDITIONS[i % len(CONDITIONS)]
        path = out_dir / f"domain_{i:03d}_{name}_{clip.path.stem.rsplit('_', 1)[-1]}.wav"
        if not path.exists():
            if voice:
                speak(clip.text, "en", path, **voice)
            elif snr is not None:
                write_wav(with_noise(load(clip.path), snr_db=snr, seed=i), path)
            else:
                shutil.copyfile(clip.path, path)
        clips.append(SynthClip(path, clip.text, "en"))
    return clips
