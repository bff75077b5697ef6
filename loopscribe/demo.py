"""The demo project's audio: espeak-ng sentences in four languages (some deliberately hard) and the
real recordings in ``shared/audio``, each with its reference transcript.

``up`` imports them into the demo project; tests and benchmarks reuse them. Synthetic speech
made only for benchmarks lives in :mod:`loopscribe.bench.synth`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.audio import SAMPLE_RATE, decode_audio
from ml_backend.errors import EnvironmentProblem

from .paths import shared_audio_dir

# Languages whose espeak-ng voices Whisper base recognizes (FACTS.md); others come out garbled.
SENTENCES: dict[str, list[str]] = {
    # First sentence of each language: recognized, with the right language, at 130–160 wpm.
    "en": [
        "Please call me back tomorrow morning.",
        "The meeting starts at ten o'clock.",
        "The quick brown fox jumps over the lazy dog.",
    ],
    "de": [
        "Ich möchte einen Kaffee trinken.",
        "Ich habe heute keine Zeit.",
    ],
    "es": [
        "¿Dónde está la estación de tren?",
        "Hoy hace mucho calor en la ciudad.",
    ],
    "it": [
        "Oggi fa molto caldo in città.",
        "Il treno per Roma parte alle otto del mattino.",
    ],
}


@dataclass(frozen=True)
class ReferenceClip:
    """A recording and what is said in it."""

    path: Path
    text: str
    language: str  # the main language; bilingual files carry several segments


SynthClip = ReferenceClip  # espeak-ng speech is a reference clip too


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, language: str, out: Path, *, speed: int = 140, pitch: int = 50, voice: str | None = None) -> Path:
    """Write espeak-ng speech to ``out`` (WAV, 22.05 kHz)."""
    if not have_espeak():
        raise EnvironmentProblem("espeak-ng is not installed (apt-get install espeak-ng)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["espeak-ng", "-v", voice or language, "-s", str(speed), "-p", str(pitch), "-w", str(out), text]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def with_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """White noise mixed at ``snr_db`` (deterministic)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(audio.shape).astype(np.float32)
    signal_power = float(np.mean(audio**2)) or 1e-8
    noise *= np.sqrt(signal_power / (10 ** (snr_db / 10)) / float(np.mean(noise**2)))
    return (audio + noise).astype(np.float32)


def write_wav(audio: np.ndarray, out: Path) -> Path:
    import soundfile as sf

    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, audio, SAMPLE_RATE, subtype="PCM_16")
    return out


def sentence_clips(out_dir: Path, languages: list[str] | None = None, per_language: int = 1) -> list[SynthClip]:
    """One WAV per sentence, cached by name in ``out_dir``."""
    clips = []
    for lang in languages or list(SENTENCES):
        for i, text in enumerate(SENTENCES[lang][:per_language]):
            path = out_dir / f"espeak_{lang}_{i}.wav"
            if not path.exists():
                speak(text, lang, path)
            clips.append(SynthClip(path, text, lang))
    return clips


def load(path: Path) -> np.ndarray:
    return decode_audio(path)


def demo_clips(out_dir: Path) -> list[SynthClip]:
    """Multilingual demo speech with deliberately hard cases, so the ranking has something to rank:
    clean sentences in four languages, fast speech, noisy speech, and a sentence in the wrong voice."""
    clips = sentence_clips(out_dir, list(SENTENCES), per_language=2)
    hard: list[tuple[str, str, str, dict[str, Any]]] = [
        ("fast_en", SENTENCES["en"][2], "en", dict(speed=280)),
        ("wrongvoice_de", SENTENCES["de"][0], "de", dict(voice="en")),
        ("slow_it", SENTENCES["it"][1], "it", dict(speed=90, pitch=20)),
    ]
    for name, text, lang, kwargs in hard:
        path = out_dir / f"demo_{name}.wav"
        if not path.exists():
            speak(text, lang, path, **kwargs)
        clips.append(SynthClip(path, text, lang))
    noisy = out_dir / "demo_noisy_es.wav"
    if not noisy.exists():
        clean = sentence_clips(out_dir, ["es"], per_language=1)[0]
        write_wav(with_noise(load(clean.path), snr_db=0.0, seed=1), noisy)
    clips.append(SynthClip(noisy, SENTENCES["es"][0], "es"))
    return clips


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
