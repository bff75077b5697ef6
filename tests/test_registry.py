"""Model registry (promote, reject, rollback) and the live engine's hot swap, with small fakes.

The registry tests run on SQLite and, marked ``distributed``, on a real PostgreSQL on loopback.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ml_backend.database import database_url
from ml_backend.live import LiveEngine
from ml_backend.model_store import ResolvedModel
from ml_backend.registry import GLOBAL, ModelVersion, Registry, RegistryError

BASE = "whisper-base-abc"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.distributed)])
def database(request, tmp_path) -> str:
    """The URL of an empty database for the registry's metadata, on the engine under test."""
    if request.param == "sqlite":
        return database_url(tmp_path / "ledger.db")
    from servers import fresh_database

    return fresh_database(request.getfixturevalue("postgres_url"))


def candidate(registry: Registry, tmp_path, name: str, parent: str = BASE) -> str:
    adapter = tmp_path / f"adapter-{name}"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    registry.add(ModelVersion(version=name, base_version=BASE, base_model="/models/base", parent=parent, project=1,
                              created_at=f"2026-11-24T10:00:0{len(registry.list())}Z"), adapter)
    return name


def test_promote_reject_and_rollback_in_a_project_lineage(database, tmp_path):
    registry = Registry(tmp_path, database)
    assert registry.live(BASE, 1) is None  # the base is live until something is promoted
    v1 = candidate(registry, tmp_path, "v1")
    assert registry.get(v1).status == "candidate"
    assert registry.promote(v1, BASE) == BASE  # into the lineage of the project it was trained for
    assert registry.live(BASE, 1).version == v1 and registry.get(v1).status == "live"
    assert registry.live(BASE, 2) is None and registry.live(BASE) is None  # nobody else's model changed
    v2 = candidate(registry, tmp_path, "v2", parent=v1)
    registry.update(v2, status="rejected")
    assert registry.live(BASE, 1).version == v1  # a rejected candidate never goes live by itself
    v3 = candidate(registry, tmp_path, "v3", parent=v1)
    registry.promote(v3, BASE)
    assert registry.get(v1).status == "retired" and registry.live(BASE, 1).version == v3
    with pytest.raises(RegistryError):
        registry.rollback(BASE)  # the global lineage has nothing to roll back to
    assert registry.rollback(BASE, scope="project-1") == v1  # the previous live version
    assert registry.live(BASE, 1).version == v1 and registry.get(v3).status == "retired"
    assert registry.rollback(BASE, to=BASE, scope="project-1") == BASE
    assert registry.live(BASE, 1) is None
    with pytest.raises(RegistryError):
        registry.rollback(BASE, to=BASE, scope="project-1")  # already live
    assert [h["action"] for h in registry.history("project-1")] == ["promote", "promote", "rollback", "rollback"]
    assert registry.history("global") == []


def test_global_default_serves_projects_without_their_own(database, tmp_path):
    registry = Registry(tmp_path, database)
    v1 = candidate(registry, tmp_path, "v1")
    v2 = candidate(registry, tmp_path, "v2")
    with pytest.raises(RegistryError, match="project 1"):
        registry.promote(v1, BASE, scope="project-2")  # project 1's corrections never silently serve project 2
    registry.promote(v1, BASE, scope=GLOBAL)  # an admin shares it explicitly
    assert registry.choose(BASE, 2) == registry.choose(BASE) and registry.choose(BASE, 2).scope == GLOBAL
    registry.promote(v2, BASE)  # project 1's own lineage wins over the default
    assert registry.choose(BASE, 1).version.version == v2 and registry.choose(BASE, 1).scope == "project-1"
    assert registry.live(BASE, 2).version == v1
    registry.promote(v1, BASE)  # now live in two lineages
    registry.rollback(BASE, to=BASE, scope="project-1")
    assert registry.get(v1).status == "live"  # the global lineage still serves it: not retired
    assert registry.choose(BASE, 1).version is None and registry.choose(BASE, 1).scope == "project-1"
    assert [p["scope"] for p in registry.pointers()] == [GLOBAL, "project-1"]


def test_a_single_lineage_registry_migrates_in_place(database, tmp_path):
    registry = Registry(tmp_path, database)
    v1 = candidate(registry, tmp_path, "v1")
    registry.update(v1, status="live")
    (registry.root / "live.json").write_text(json.dumps({"version": v1, "base_version": BASE, "since": 1.0}))
    (registry.root / "history.jsonl").write_text(json.dumps({"at": 1.0, "action": "promote", "from": BASE,
                                                             "to": v1}) + "\n")
    assert Registry(tmp_path, database).live(BASE, 1).version == v1  # the project that trained it keeps it
    assert registry.live(BASE, 2) is None and registry.live(BASE) is None  # others get the base
    assert not (registry.root / "live.json").exists() and (registry.root / "live.json.migrated").is_file()
    assert registry.history() == [{"scope": "project-1", "at": 1.0, "action": "promote", "from": BASE, "to": v1}]
    assert registry.rollback(BASE, scope="project-1") == BASE  # its history works as before


def test_a_file_registry_from_before_the_database_is_moved_in(database, tmp_path):
    """The layout of earlier releases: version.json per version, live/<scope>.json, history.jsonl."""
    root = tmp_path / "registry"
    for name, status in (("v1", "retired"), ("v2", "live")):
        (root / "versions" / name / "adapter").mkdir(parents=True)
        (root / "versions" / name / "version.json").write_text(json.dumps(
            {"version": name, "base_version": BASE, "base_model": "/m", "parent": BASE, "project": 3,
             "created_at": f"2026-11-2{name[1]}T00:00:00Z", "status": status, "error_after": 0.25,
             "report": {"gate": "promoted"}}))
    (root / "live").mkdir()
    (root / "live" / "project-3.json").write_text(json.dumps(
        {"scope": "project-3", "version": "v2", "base_version": BASE, "since": 5.0}))
    (root / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in (
        {"at": 1.0, "scope": "project-3", "action": "promote", "from": BASE, "to": "v1"},
        {"at": 2.0, "scope": "project-3", "action": "promote", "from": "v1", "to": "v2"})))
    registry = Registry(tmp_path, database)
    assert [v.version for v in registry.list(3)] == ["v1", "v2"] and registry.get("v1").report == {"gate": "promoted"}
    assert registry.live(BASE, 3).version == "v2" and registry.live(BASE, 4) is None
    assert registry.adapter_path("v2").is_dir() and not (root / "live" / "project-3.json").exists()
    assert Registry(tmp_path, database).import_files() == 0  # moved once: nothing left to import
    assert registry.rollback(BASE, scope="project-3") == "v1"  # the imported history drives rollback
    assert len(registry.history("project-3")) == 3


def test_a_version_of_another_base_is_refused_and_ignored(database, tmp_path):
    registry = Registry(tmp_path, database)
    v1 = candidate(registry, tmp_path, "v1")
    with pytest.raises(RegistryError):
        registry.promote(v1, "whisper-small-xyz")
    registry.promote(v1, BASE)
    assert registry.live("whisper-small-xyz", 1) is None  # WHISPER_MODEL changed: serve that base as is


def test_add_is_atomic_and_versions_are_unique(database, tmp_path):
    registry = Registry(tmp_path, database)
    candidate(registry, tmp_path, "v1")
    with pytest.raises(RegistryError):
        registry.add(registry.get("v1"), tmp_path / "adapter-v1")
    assert [p.name for p in registry.versions_dir.iterdir()] == ["v1"]  # no temporary directory left


def test_live_model_is_the_projects_live_version_over_the_installed_base(database, tmp_path, settings):
    from ml_backend.live import live_model
    from ml_backend.model_store import resolve_base

    (tmp_path / "models").symlink_to(settings.models_dir)
    s = replace(settings, home=tmp_path, database_url=database)
    base = resolve_base(s)
    registry = Registry(tmp_path, database)
    v1 = candidate(registry, tmp_path, "v1")
    registry.update(v1, base_version=base.version)
    assert live_model(s, 1).version == base.version and live_model(s, 1).resolved.adapter is None
    registry.promote(v1, base.version)
    live = live_model(s, 1).resolved
    assert (live.version, live.root_version, live.path) == (v1, base.version, base.path)
    assert live.adapter == str(registry.adapter_path(v1))
    assert live_model(s, 2).version == live_model(s).version == base.version  # other projects: the base
    assert resolve_base(s, "base").adapter is None  # an explicit model name means that model as is
    quantized = live_model(replace(s, quantize=True, device="cpu"), 1)
    assert (quantized.version, quantized.registry_version, quantized.scope) == (f"{v1}-int8", v1, "project-1")


class FakeEngine:
    loads = 0

    def __init__(self, version: str):
        FakeEngine.loads += 1
        self.model_version = version


def test_live_engine_serves_each_project_its_model_and_hot_swaps_only_that_one(database, tmp_path, monkeypatch,
                                                                              settings):
    from ml_backend import live as live_module

    s = replace(settings, home=tmp_path, live_models_max=2, database_url=database)
    registry = Registry(tmp_path, database)
    serving = {None: BASE, 1: BASE, 2: BASE, 3: BASE}
    monkeypatch.setattr(live_module, "live_model", lambda _settings, project=None: live_module.LiveModel(
        ResolvedModel("m", "p", serving[project]), False))
    FakeEngine.loads = 0
    live = LiveEngine(s, factory=lambda _s, model: FakeEngine(model.version))
    assert live.get(1) is live.get(2) is live.get() and FakeEngine.loads == 1  # one version, one model
    v1 = candidate(registry, tmp_path, "v1")
    registry.promote(v1, BASE)
    serving[1] = v1
    bystander = live.get(2)
    assert live.version(1) == v1 and live.get(1).model_version == v1 and FakeEngine.loads == 2
    assert live.get(2) is bystander and bystander.model_version == BASE  # project 2 untouched
    serving[3] = "v3"
    assert live.get(3).model_version == "v3" and live.loaded() == [BASE, "v3"]  # LIVE_MODELS_MAX=2: v1 was LRU
    serving[1] = BASE  # rolled back: the base is still loaded
    assert live.get(1) is bystander and FakeEngine.loads == 3
