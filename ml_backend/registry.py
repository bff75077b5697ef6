"""The model registry: fine-tuned versions (LoRA adapters over a base model) and which one is live where.

Every project has its own lineage: corrections in project 3 train versions that go live for
project 3 only. A project without its own live version serves the **global** one, which
only an admin sets (``models promote V --scope global``), or the base model itself.

The metadata lives in the ledger's database (:mod:`ml_backend.schema`: ``model_versions``,
``live_pointers`` with one row per lineage, ``live_history``), so every replica and worker
sees one truth and a promotion or rollback is one transaction. The adapters are files
(:mod:`ml_backend.artifacts`)::

    ARTIFACTS_URL/versions/<version>/adapter/     (peft; default ARTIFACTS_URL: $LOOPSCRIBE_HOME/registry)

Registries from before the database kept the metadata in files beside them (``live/<scope>.json``,
``history.jsonl``, ``versions/<version>/version.json``, and before per-project lineages one
``live.json``); :meth:`Registry.import_files` moves them in on first open.
Serving processes poll the pointers and hot-swap (see :mod:`ml_backend.live`).
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from .artifacts import LOCAL_CACHE, ArtifactStore
from .database import Database
from .errors import LoopscribeError
from .schema import live_history_table, live_pointers_table, model_versions_table
from .settings import LEDGER_FILE

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class LiveChoice:
    """What serves a project: ``version`` None means the base model itself; ``scope`` says whose pointer chose."""

    version: ModelVersion | None
    scope: str  # project-N, global, or "base" (no pointer applies)


def _version_row(v: ModelVersion) -> dict[str, Any]:
    row = asdict(v)
    row["params"], row["report"] = json.dumps(v.params), json.dumps(v.report)
    return row


def _version(row: Any) -> ModelVersion:
    d = dict(row)
    d["params"], d["report"] = json.loads(d["params"] or "{}"), json.loads(d["report"] or "{}")
    return ModelVersion(**d)


def _pointer(row: Any) -> dict:
    return {"scope": row["scope"], "version": row["version"], "base_version": row["base_version"],
            "since": row["since"]}


class Registry:
    def __init__(self, home: Path, database: str | Path | None = None, artifacts: str = ""):
        """``database``: the ledger's (``Settings.ledger_url``), default ``ledger.db`` in ``home``; ``artifacts``:
        where adapters are stored (``ARTIFACTS_URL``), default ``registry/`` in ``home``."""
        self.root = Path(home) / "registry"
        self.versions_dir = self.root / "versions"
        self.db = Database(database if database is not None else Path(home) / LEDGER_FILE)
        self.artifacts = ArtifactStore(artifacts or str(self.root), cache=Path(home) / LOCAL_CACHE)
        self.import_files()

    @classmethod
    def open(cls, settings: Settings) -> Registry:
        """The registry ``settings`` name, built once per process: serving asks for it on every request."""
        return _opened(settings.home, settings.ledger_url, settings.artifacts_url)

    # ---- the registry before the database -------------------------------------------------------

    def _legacy_files(self) -> builtins.list[Path]:
        """The files of an earlier release's registry: each version's ``version.json`` first, then the pointers
        (``live/<scope>.json``, the single-lineage ``live.json``) and ``history.jsonl``."""
        files = sorted(self.versions_dir.glob("*/version.json")) + sorted((self.root / "live").glob("*.json"))
        files += [self.root / "live.json", self.root / "history.jsonl"]
        return [f for f in files if f.is_file()]

    def import_files(self) -> int:
        """Move a file registry's metadata into the database; what is there already is kept, so a second
        process importing at the same time changes nothing. A single-lineage ``live.json`` (before per-project
        lineages) goes to the lineage of the project that trained its version: A keeps it, the others fall
        back to the base (an admin may still promote it with ``--scope global``). Returns rows added."""
        files = self._legacy_files()
        if not files:
            return 0
        added = 0
        with self.db.transaction() as db:
            known = set(db.execute(select(model_versions_table.c.version)).scalars())
            for path in (f for f in files if f.name == "version.json"):
                info = ModelVersion(**json.loads(path.read_text()))
                if info.version not in known:
                    db.execute(insert(model_versions_table).values(**_version_row(info)))
                    known.add(info.version)
                    added += 1
            pointers = [json.loads(p.read_text()) for p in files if p.parent == self.root / "live"]
            legacy_scope = None
            legacy = self.root / "live.json"
            if legacy in files:
                try:
                    pointer = json.loads(legacy.read_text())
                except json.JSONDecodeError:
                    pointer = {}
                version = pointer.get("version")
                legacy_scope = GLOBAL
                if version in known:
                    legacy_scope = self._get(db, version).scope
                if version and pointer.get("base_version"):
                    pointers.append(pointer | {"scope": legacy_scope})
            for pointer in pointers:
                if self._read_pointer(db, pointer["scope"]) is None:
                    db.execute(insert(live_pointers_table).values(
                        scope=pointer["scope"], version=pointer["version"], base_version=pointer["base_version"],
                        since=float(pointer.get("since") or time.time())))
                    added += 1
            history = self.root / "history.jsonl"
            if history in files:
                seen = {(h["at"], h["scope"], h["action"], h["from"], h["to"]) for h in self._history(db, None)}
                for line in history.read_text().splitlines():
                    if not line.strip():
                        continue
                    h = json.loads(line)
                    h["scope"] = h.get("scope") or legacy_scope or GLOBAL
                    if (h["at"], h["scope"], h["action"], h["from"], h["to"]) not in seen:
                        db.execute(insert(live_history_table).values(
                            at=h["at"], scope=h["scope"], action=h["action"], from_version=h["from"],
                            to_version=h["to"]))
                        added += 1
        for path in files:  # kept beside, renamed: nothing reads them any more
            suffix = ".migrated" if path.name == "live.json" else ".imported"
            try:
                os.replace(path, path.with_name(path.name + suffix))
            except FileNotFoundError:
                pass  # another process imported them meanwhile
        log.info("registry: moved %d rows from the files under %s into the database", added, self.root)
        return added

    # ---- reading --------------------------------------------------------------------------------

    @staticmethod
    def _read_pointer(db: Connection, scope: str) -> dict | None:
        project_of(scope)  # validates
        row = db.execute(select(live_pointers_table).where(live_pointers_table.c.scope == scope)).mappings().first()
        return _pointer(row) if row else None

    @staticmethod
    def _get(db: Connection, version: str) -> ModelVersion:
        row = db.execute(select(model_versions_table).where(model_versions_table.c.version == version)) \
            .mappings().first()
        if row is None:
            raise RegistryError(f"no model version {version!r} in the registry")
        return _version(row)

    @staticmethod
    def _history(db: Connection, scope: str | None) -> builtins.list[dict]:
        t = live_history_table
        query = select(t).order_by(t.c.id)
        if scope is not None:
            query = query.where(t.c.scope == scope)
        return [{"at": r["at"], "scope": r["scope"], "action": r["action"], "from": r["from_version"],
                 "to": r["to_version"]} for r in db.execute(query).mappings()]

    def live_pointer(self, scope: str = GLOBAL) -> dict | None:
        with self.db.connect() as db:
            return self._read_pointer(db, scope)

    def pointers(self) -> builtins.list[dict]:
        """Every lineage's live pointer (global first, then projects by number)."""
        with self.db.connect() as db:
            rows = [_pointer(r) for r in db.execute(select(live_pointers_table)).mappings()]
        return sorted(rows, key=lambda p: (p["scope"] != GLOBAL, project_of(p["scope"]) or 0))

    def choose(self, base_version: str, project: int | None = None) -> LiveChoice:
        """The version serving ``project``: its own lineage's pointer, else the global one, else the base.

        A pointer made for another base (``WHISPER_MODEL`` changed) is ignored. A project rolled back to
        the base serves the base, not the global version: its admin chose so.
        """
        scopes = [scope_of(project), GLOBAL] if project is not None else [GLOBAL]
        with self.db.connect() as db:
            for scope in scopes:
                pointer = self._read_pointer(db, scope)
                if not pointer or pointer.get("base_version") != base_version:
                    continue
                if pointer.get("version") == base_version:
                    return LiveChoice(None, scope)
                return LiveChoice(self._get(db, pointer["version"]), scope)
        return LiveChoice(None, "base")

    def live(self, base_version: str, project: int | None = None) -> ModelVersion | None:
        """The fine-tuned version serving ``project`` over ``base_version``; None when the base itself serves."""
        return self.choose(base_version, project).version

    def get(self, version: str) -> ModelVersion:
        with self.db.connect() as db:
            return self._get(db, version)

    def adapter_path(self, version: str) -> Path:
        """The version's adapter on this machine (downloaded first when ``ARTIFACTS_URL`` is remote)."""
        return self.artifacts.local_dir(f"versions/{version}/adapter")

    def list(self, project: int | None = None) -> builtins.list[ModelVersion]:
        """Every version, oldest first; only those trained for ``project`` when it is given."""
        t = model_versions_table
        query = select(t).order_by(t.c.created_at, t.c.version)
        if project is not None:
            query = query.where(t.c.project == project)
        with self.db.connect() as db:
            return [_version(r) for r in db.execute(query).mappings()]

    def history(self, scope: str | None = None) -> builtins.list[dict]:
        """Changes of live versions, oldest first; only ``scope``'s when it is given."""
        with self.db.connect() as db:
            return self._history(db, scope)

    # ---- writing: each one transaction ----------------------------------------------------------

    def add(self, version: ModelVersion, adapter_dir: Path) -> ModelVersion:
        """Store a candidate: its adapter is stored first, its row goes in last, so a crash leaves no half
        version (an adapter without a row is replaced by the next add of that name)."""
        with self.db.transaction() as db:
            if db.execute(select(model_versions_table.c.version)
                          .where(model_versions_table.c.version == version.version)).first() is not None:
                raise RegistryError(f"model version {version.version!r} already exists")
            self.artifacts.put_dir(adapter_dir, f"versions/{version.version}/adapter")
            db.execute(insert(model_versions_table).values(**_version_row(version)))
        return version

    @staticmethod
    def _set(db: Connection, version: str, **changes: Any) -> None:
        if "params" in changes:
            changes["params"] = json.dumps(changes["params"])
        if "report" in changes:
            changes["report"] = json.dumps(changes["report"])
        db.execute(update(model_versions_table).where(model_versions_table.c.version == version).values(**changes))

    def update(self, version: str, **changes: Any) -> ModelVersion:
        with self.db.transaction() as db:
            updated = replace(self._get(db, version), **changes)  # unknown fields fail here, before writing
            self._set(db, version, **changes)
            return updated

    def _switch_live(self, db: Connection, scope: str, version: str, base_version: str, action: str) -> str:
        """Point ``scope``'s pointer at ``version``; retire the version it replaces unless another lineage
        still serves it. Inside the caller's transaction."""
        previous = (self._read_pointer(db, scope) or {}).get("version") or base_version
        db.execute(delete(live_pointers_table).where(live_pointers_table.c.scope == scope))
        db.execute(insert(live_pointers_table).values(scope=scope, version=version, base_version=base_version,
                                                      since=time.time()))
        if version != base_version:
            self._set(db, version, status="live")
        still_live = db.execute(select(live_pointers_table.c.scope)
                                .where(live_pointers_table.c.version == previous)).first() is not None
        if previous not in (base_version, version) and not still_live:
            self._set(db, previous, status="retired")
        db.execute(insert(live_history_table).values(at=time.time(), scope=scope, action=action,
                                                     from_version=previous, to_version=version))
        return previous

    @staticmethod
    def _check_fits(info: ModelVersion, scope: str, base_version: str) -> None:
        if info.base_version != base_version:
            raise RegistryError(f"{info.version} was trained on {info.base_version}, not the served {base_version}")
        if scope != GLOBAL and info.project is not None and info.scope != scope:
            raise RegistryError(f"{info.version} was trained on project {info.project}'s corrections, not for "
                                f"{scope}; train that project, or share it with every project: --scope global")

    def promote(self, version: str, base_version: str | None = None, *, scope: str | None = None) -> str:
        """Make ``version`` live in ``scope`` (default: its own project's lineage). Returns the version it replaced."""
        with self.db.transaction() as db:
            info = self._get(db, version)
            scope = scope or info.scope
            project_of(scope)  # validates
            self._check_fits(info, scope, base_version or info.base_version)
            return self._switch_live(db, scope, version, info.base_version, "promote")

    def rollback(self, base_version: str, to: str | None = None, *, scope: str = GLOBAL) -> str:
        """Make ``scope``'s previous live version (or ``to``, or the base) live again. Returns the new one."""
        with self.db.transaction() as db:
            current = (self._read_pointer(db, scope) or {}).get("version") or base_version
            if to is None:
                earlier = [h["from"] for h in self._history(db, scope) if h["to"] == current and h["from"] != current]
                to = earlier[-1] if earlier else base_version
            if to != base_version:
                self._check_fits(self._get(db, to), scope, base_version)
            if to == current:
                raise RegistryError(f"{to} is already live in {scope}")
            self._switch_live(db, scope, to, base_version, "rollback")
            return to


@functools.lru_cache(maxsize=16)
def _opened(home: Path, database: str, artifacts: str) -> Registry:
    return Registry(home, database, artifacts)
