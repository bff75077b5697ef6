"""The model registry: fine-tuned versions (LoRA adapters over a base model) and which one is live.

Layout under ``$LOOPSCRIBE_HOME/registry``::

    live.json                  {"version": ..., "base_version": ..., "since": ...}  (os.replace: atomic)
    history.jsonl              every change of the live version, for rollback and audit
    versions/<version>/        version.json (metadata, status, evaluation report) + adapter/ (peft)

The base model is the root of every lineage and is live when ``live.json`` is absent or
names it. Serving processes poll ``live.json`` and hot-swap (see :mod:`ml_backend.live`).
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
    def gain(self) -> float | None:
        if self.error_before is None or self.error_after is None:
            return None
        return self.error_before - self.error_after


class RegistryError(LoopscribeError, RuntimeError):
    pass


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Registry:
    def __init__(self, home: Path):
        self.root = Path(home) / "registry"
        self.versions_dir = self.root / "versions"

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

    # ---- reading --------------------------------------------------------------------------------

    def live_pointer(self) -> dict | None:
        try:
            return json.loads((self.root / "live.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def live(self, base_version: str) -> ModelVersion | None:
        """The live fine-tuned version on top of ``base_version``; None when the base itself is live."""
        pointer = self.live_pointer()
        if not pointer or pointer.get("version") == base_version or pointer.get("base_version") != base_version:
            return None
        return self.get(pointer["version"])

    def get(self, version: str) -> ModelVersion:
        path = self.versions_dir / version / "version.json"
        if not path.is_file():
            raise RegistryError(f"no model version {version!r} in {self.versions_dir}")
        return ModelVersion(**json.loads(path.read_text()))

    def adapter_path(self, version: str) -> Path:
        return self.versions_dir / version / "adapter"

    def list(self) -> list[ModelVersion]:
        if not self.versions_dir.is_dir():
            return []
        out = [self.get(p.name) for p in self.versions_dir.iterdir() if (p / "version.json").is_file()]
        return sorted(out, key=lambda v: v.created_at)

    def history(self) -> builtins.list[dict]:
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

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

    def _switch_live(self, version: str, base_version: str, action: str) -> str:
        """Point live.json at ``version``; retire the previous fine-tuned live one. Caller holds the lock."""
        previous = (self.live_pointer() or {}).get("version") or base_version
        if previous != base_version and previous != version and (self.versions_dir / previous).is_dir():
            self._set_status(previous, "retired")
        if version != base_version:
            self._set_status(version, "live")
        _write_json_atomic(self.root / "live.json",
                           {"version": version, "base_version": base_version, "since": time.time()})
        with open(self.root / "history.jsonl", "a") as f:
            f.write(json.dumps({"at": time.time(), "action": action, "from": previous, "to": version}) + "\n")
        return previous

    def promote(self, version: str, base_version: str | None = None) -> str:
        """Make ``version`` live (atomic pointer swap). Returns the version it replaced."""
        with self._locked():
            info = self.get(version)
            if base_version is not None and info.base_version != base_version:
                raise RegistryError(f"{version} was trained on {info.base_version}, not the served {base_version}")
            return self._switch_live(version, info.base_version, "promote")

    def rollback(self, base_version: str, to: str | None = None) -> str:
        """Make the previous live version (or ``to``, or the base) live again. Returns the new live version."""
        with self._locked():
            current = (self.live_pointer() or {}).get("version") or base_version
            if to is None:
                earlier = [h["from"] for h in self.history() if h["to"] == current and h["from"] != current]
                to = earlier[-1] if earlier else base_version
            if to != base_version:
                info = self.get(to)
                if info.base_version != base_version:
                    raise RegistryError(f"{to} was trained on {info.base_version}, not the served {base_version}")
            if to == current:
                raise RegistryError(f"{to} is already live")
            self._switch_live(to, base_version, "rollback")
            return to
