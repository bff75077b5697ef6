"""Deterministic test and demo speech from espeak-ng (synthetic, but Whisper base reads it)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml_backend.audio import SAMPLE_RATE, decode_audio

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
class SynthClip:
    path: Path
    text: str
    language: str


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, language: str, out: Path, *, speed: int = 140, pitch: int = 50, voice: str | None = None) -> Path:
    """Write espeak-ng speech to ``out`` (WAV, 22.05 kHz)."""
    if not have_espeak():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
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
    hard = [
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
VOICES = [dict(speed=150, pitch=50), dict(speed=130, pitch=35), dict(speed=170, pitch=65), dict(speed=140, pitch=45)]


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
CONDITIONS = [("clean", {}, None), ("snr15", {}, 15.0), ("fast", dict(speed=205), None), ("snr10", {}, 10.0)]


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
