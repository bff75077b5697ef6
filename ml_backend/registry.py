"""The model registry: fine-tuned versions (LoRA adapters over a base model) and which one is live where.

Every project has its own lineage: corrections in project 3 train versions that go live for
project 3 only. A project without its own live version serves the **global** one, which
only an admin sets (``models promote V --scope global``), or the base model itself.

Layout under ``$LOOPSCRIBE_HOME/registry``::

    live/<scope>.json          {"scope", "version", "base_version", "since"}; scope is ``project-N`` or
                               ``global`` (os.replace: atomic; one row per scope in a database)
    history.jsonl              every change of a live version: {"at", "scope", "action", "from", "to"}
    versions/<version>/        version.json (metadata, status, evaluation report) + adapter/ (peft)

Registries from before per-project lineages had one ``live.json``; it is moved in place to the
lineage of the project whose corrections trained the version (see :meth:`Registry.migrate`).
Serving processes poll the pointers and hot-swap (see :mod:`ml_backend.live`).
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from .errors import LoopscribeError

GLOBAL = "global"


class RegistryError(LoopscribeError, RuntimeError):
    pass


def scope_of(project: int | None) -> str:
    """The lineage a project is served from: ``project-N``, or ``global`` for no project."""
    return GLOBAL if project is None else f"project-{project}"


def project_of(scope: str) -> int | None:
    if scope == GLOBAL:
        return None
    name, _, number = scope.partition("-")
    if name != "project" or not number.isdigit():
        raise RegistryError(f"not a lineage: {scope!r} (expected 'global' or 'project-N')")
    return int(number)


@dataclass(frozen=True)
class ModelVersion:
    version: str
    base_version: str
    base_model: str  # the path or name the base was resolved from
    parent: str  # the version it was trained from (the live one at the time)
    project: int | None
    created_at: str
    status: str = "candidate"
    train_size: int = 0
    heldout_size: int = 0
    error_before: float | None = None  # live model on the held-out split (WER, CER for zh/ja/…)
    error_after: float | None = None  # this version on the same split
    params: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # the full evaluation report

    @property
    def scope(self) -> str:
        """The lineage this version was trained for (and may go live in without ``--scope global``)."""
        return scope_of(self.project)

    @property
    def gain(self) -> float | None:
        if self.error_before is None or self.error_after is None:
            return None
        return self.error_before - self.error_after


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class LiveChoice:
    """What serves a project: ``version`` None means the base model itself; ``scope`` says whose pointer chose."""

    version: ModelVersion | None
    scope: str  # project-N, global, or "base" (no pointer applies)


class Registry:
    def __init__(self, home: Path):
        self.root = Path(home) / "registry"
        self.versions_dir = self.root / "versions"
        self.live_dir = self.root / "live"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize writers (promote, rollback, status changes) across processes."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- migration ------------------------------------------------------------------------------

    def migrate(self) -> str | None:
        """Move a single-lineage ``live.json`` into the lineage of the project that trained its version.

        Before lineages, a version trained on project A served every project. Keeping that for B would be
        exactly the silent change per-project lineages exist to stop, so A keeps it and the others fall back
        to the base (an admin may still promote it with ``--scope global``). Old history lines get the same
        scope. Returns the scope the pointer moved to, or None when there was nothing to migrate.
        """
        legacy = self.root / "live.json"
        if not legacy.is_file():
            return None
        with self._locked():
            if not legacy.is_file():  # another process migrated meanwhile
                return None
            try:
                pointer = json.loads(legacy.read_text())
            except json.JSONDecodeError:
                pointer = {}
            version = pointer.get("version")
            scope = GLOBAL
            if version and (self.versions_dir / version / "version.json").is_file():
                scope = self.get(version).scope
            if version and pointer.get("base_version"):
                self.live_dir.mkdir(parents=True, exist_ok=True)
                _write_json_atomic(self._pointer_path(scope), pointer | {"scope": scope})
            history = self.root / "history.jsonl"
            if history.is_file():
                lines = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
                with open(history.with_suffix(".tmp"), "w") as f:
                    for h in lines:
                        f.write(json.dumps({"scope": scope} | h) + "\n")
                os.replace(history.with_suffix(".tmp"), history)
            os.replace(legacy, self.root / "live.json.migrated")
        return scope

    # ---- reading --------------------------------------------------------------------------------

    def _pointer_path(self, scope: str) -> Path:
        project_of(scope)  # validates
        return self.live_dir / f"{scope}.json"

    def _read_pointer(self, scope: str) -> dict | None:
        try:
            return json.loads(self._pointer_path(scope).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def live_pointer(self, scope: str = GLOBAL) -> dict | None:
        self.migrate()
        return self._read_pointer(scope)

    def pointers(self) -> builtins.list[dict]:
        """Every lineage's live pointer (global first, then projects by number)."""
        self.migrate()
        return self._pointers()

    def _pointers(self) -> builtins.list[dict]:
        if not self.live_dir.is_dir():
            return []
        out = []
        for path in self.live_dir.glob("*.json"):
            try:
                out.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
        return sorted(out, key=lambda p: (p["scope"] != GLOBAL, project_of(p["scope"]) or 0))

    def choose(self, base_version: str, project: int | None = None) -> LiveChoice:
        """The version serving ``project``: its own lineage's pointer, else the global one, else the base.

        A pointer made for another base (``WHISPER_MODEL`` changed) is ignored. A project rolled back to
        the base serves the base, not the global version: its admin chose so.
        """
        self.migrate()
        scopes = [scope_of(project), GLOBAL] if project is not None else [GLOBAL]
        for scope in scopes:
            pointer = self._read_pointer(scope)
            if not pointer or pointer.get("base_version") != base_version:
                continue
            if pointer.get("version") == base_version:
                return LiveChoice(None, scope)
            return LiveChoice(self.get(pointer["version"]), scope)
        return LiveChoice(None, "base")

    def live(self, base_version: str, project: int | None = None) -> ModelVersion | None:
        """The fine-tuned version serving ``project`` over ``base_version``; None when the base itself serves."""
        return self.choose(base_version, project).version

    def get(self, version: str) -> ModelVersion:
        path = self.versions_dir / version / "version.json"
        if not path.is_file():
            raise RegistryError(f"no model version {version!r} in {self.versions_dir}")
        return ModelVersion(**json.loads(path.read_text()))

    def adapter_path(self, version: str) -> Path:
        return self.versions_dir / version / "adapter"

    def list(self, project: int | None = None) -> builtins.list[ModelVersion]:
        """Every version, oldest first; only those trained for ``project`` when it is given."""
        if not self.versions_dir.is_dir():
            return []
        out = [self.get(p.name) for p in self.versions_dir.iterdir() if (p / "version.json").is_file()]
        return sorted((v for v in out if project is None or v.project == project), key=lambda v: v.created_at)

    def history(self, scope: str | None = None) -> builtins.list[dict]:
        """Changes of live versions, oldest first; only ``scope``'s when it is given."""
        self.migrate()
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [h for h in rows if scope is None or h.get("scope") == scope]

    # ---- writing --------------------------------------------------------------------------------

    def add(self, version: ModelVersion, adapter_dir: Path) -> ModelVersion:
        """Store a candidate (metadata + adapter) atomically: a crash leaves no half version."""
        with self._locked():
            target = self.versions_dir / version.version
            if target.exists():
                raise RegistryError(f"model version {version.version!r} already exists")
            tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=self.versions_dir))
            try:
                shutil.copytree(adapter_dir, tmp / "adapter")
                _write_json_atomic(tmp / "version.json", asdict(version))
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return version

    def _set_status(self, version: str, status: str, **changes) -> ModelVersion:
        updated = replace(self.get(version), status=status, **changes)
        _write_json_atomic(self.versions_dir / version / "version.json", asdict(updated))
        return updated

    def update(self, version: str, **changes) -> ModelVersion:
        with self._locked():
            current = self.get(version)
            return self._set_status(version, changes.pop("status", current.status), **changes)

    def _live_anywhere(self, version: str) -> bool:
        return any(p.get("version") == version for p in self._pointers())

    def _switch_live(self, scope: str, version: str, base_version: str, action: str) -> str:
        """Point ``scope``'s pointer at ``version``; retire the version it replaces unless another lineage
        still serves it. Caller holds the lock."""
        previous = (self._read_pointer(scope) or {}).get("version") or base_version
        self.live_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self._pointer_path(scope),
                           {"scope": scope, "version": version, "base_version": base_version, "since": time.time()})
        if version != base_version:
            self._set_status(version, "live")
        if previous not in (base_version, version) and (self.versions_dir / previous).is_dir() \
                and not self._live_anywhere(previous):
            self._set_status(previous, "retired")
        with open(self.root / "history.jsonl", "a") as f:
            f.write(json.dumps({"at": time.time(), "scope": scope, "action": action, "from": previous,
                                "to": version}) + "\n")
        return previous

    def _check_fits(self, info: ModelVersion, scope: str, base_version: str) -> None:
        if info.base_version != base_version:
            raise RegistryError(f"{info.version} was trained on {info.base_version}, not the served {base_version}")
        if scope != GLOBAL and info.project is not None and info.scope != scope:
            raise RegistryError(f"{info.version} was trained on project {info.project}'s corrections, not for "
                                f"{scope}; train that project, or share it with every project: --scope global")

    def promote(self, version: str, base_version: str | None = None, *, scope: str | None = None) -> str:
        """Make ``version`` live in ``scope`` (default: its own project's lineage). Returns the version it replaced."""
        self.migrate()  # before the lock: migrating takes it too
        with self._locked():
            info = self.get(version)
            scope = scope or info.scope
            self._check_fits(info, scope, base_version or info.base_version)
            return self._switch_live(scope, version, info.base_version, "promote")

    def rollback(self, base_version: str, to: str | None = None, *, scope: str = GLOBAL) -> str:
        """Make ``scope``'s previous live version (or ``to``, or the base) live again. Returns the new one."""
        self.migrate()
        with self._locked():
            current = (self._read_pointer(scope) or {}).get("version") or base_version
            if to is None:
                earlier = [h["from"] for h in self.history(scope) if h["to"] == current and h["from"] != current]
                to = earlier[-1] if earlier else base_version
            if to != base_version:
                self._check_fits(self.get(to), scope, base_version)
            if to == current:
                raise RegistryError(f"{to} is already live in {scope}")
            self._switch_live(scope, to, base_version, "rollback")
            return to
