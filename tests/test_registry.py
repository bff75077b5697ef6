"""Model registry (promote, reject, rollback) and the live engine's hot swap, with small fakes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ml_backend.live import LiveEngine
from ml_backend.model_store import ResolvedModel
from ml_backend.registry import ModelVersion, Registry, RegistryError

BASE = "whisper-base-abc"


def candidate(registry: Registry, tmp_path, name: str, parent: str = BASE) -> str:
    adapter = tmp_path / f"adapter-{name}"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    registry.add(ModelVersion(version=name, base_version=BASE, base_model="/models/base", parent=parent, project=1,
                              created_at=f"2026-11-24T10:00:0{len(registry.list())}Z"), adapter)
    return name


def test_promote_reject_and_rollback(tmp_path):
    registry = Registry(tmp_path)
    assert registry.live(BASE) is None  # the base is live until something is promoted
    v1 = candidate(registry, tmp_path, "v1")
    assert registry.get(v1).status == "candidate"
    assert registry.promote(v1, BASE) == BASE
    assert registry.live(BASE).version == v1 and registry.get(v1).status == "live"
    v2 = candidate(registry, tmp_path, "v2", parent=v1)
    registry.update(v2, status="rejected")
    assert registry.live(BASE).version == v1  # a rejected candidate never goes live by itself
    v3 = candidate(registry, tmp_path, "v3", parent=v1)
    registry.promote(v3, BASE)
    assert registry.get(v1).status == "retired" and registry.live(BASE).version == v3
    assert registry.rollback(BASE) == v1  # the previous live version
    assert registry.live(BASE).version == v1 and registry.get(v3).status == "retired"
    assert registry.rollback(BASE, to=BASE) == BASE
    assert registry.live(BASE) is None
    with pytest.raises(RegistryError):
        registry.rollback(BASE, to=BASE)  # already live
    assert [h["action"] for h in registry.history()] == ["promote", "promote", "rollback", "rollback"]


def test_a_version_of_another_base_is_refused_and_ignored(tmp_path):
    registry = Registry(tmp_path)
    v1 = candidate(registry, tmp_path, "v1")
    with pytest.raises(RegistryError):
        registry.promote(v1, "whisper-small-xyz")
    registry.promote(v1, BASE)
    assert registry.live("whisper-small-xyz") is None  # WHISPER_MODEL changed: serve that base as is


def test_add_is_atomic_and_versions_are_unique(tmp_path):
    registry = Registry(tmp_path)
    candidate(registry, tmp_path, "v1")
    with pytest.raises(RegistryError):
        registry.add(registry.get("v1"), tmp_path / "adapter-v1")
    assert [p.name for p in registry.versions_dir.iterdir()] == ["v1"]  # no temporary directory left


def test_live_model_is_the_live_version_over_the_installed_base(tmp_path, settings):
    from ml_backend.live import live_model
    from ml_backend.model_store import resolve_base

    (tmp_path / "models").symlink_to(settings.models_dir)
    s = replace(settings, home=tmp_path)
    base = resolve_base(s)
    registry = Registry(tmp_path)
    v1 = candidate(registry, tmp_path, "v1")
    registry.update(v1, base_version=base.version)
    assert live_model(s).version == base.version and live_model(s).resolved.adapter is None
    registry.promote(v1, base.version)
    live = live_model(s).resolved
    assert (live.version, live.root_version, live.path) == (v1, base.version, base.path)
    assert live.adapter == str(registry.adapter_path(v1))
    assert resolve_base(s, "base").adapter is None  # an explicit model name means that model as is
    quantized = live_model(replace(s, quantize=True, device="cpu"))
    assert (quantized.version, quantized.registry_version) == (f"{v1}-int8", v1)


class FakeEngine:
    loads = 0

    def __init__(self, version: str):
        FakeEngine.loads += 1
        self.model_version = version


def test_live_engine_hot_swaps_on_promotion_and_rollback(tmp_path, monkeypatch, settings):
    from ml_backend import live as live_module

    s = replace(settings, home=tmp_path)
    registry = Registry(tmp_path)
    live_version = {"v": BASE}
    monkeypatch.setattr(live_module, "live_model",
                        lambda _settings: live_module.LiveModel(ResolvedModel("m", "p", live_version["v"]), False))
    live = LiveEngine(s, factory=lambda _s: FakeEngine(live_version["v"]))
    assert live.get().model_version == BASE
    assert live.get() is live.get() and FakeEngine.loads == 1  # no reload while nothing changes
    v1 = candidate(registry, tmp_path, "v1")
    registry.promote(v1, BASE)
    live_version["v"] = v1
    assert live.version == v1 and live.get().model_version == v1
    live_version["v"] = BASE
    assert live.get().model_version == BASE and FakeEngine.loads == 3
