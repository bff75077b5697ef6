"""Where adapters (and, when it is set, decoded training audio) live: ``ARTIFACTS_URL`` through fsspec;
a folder in ``LOOPSCRIBE_HOME`` by default.

Versions are immutable, so a remote artifact (``s3://bucket/prefix``, or any fsspec URL whose
package is installed) is uploaded once and downloaded once per machine into a local cache,
from where the model loader reads it. Uploads go file by file and the version's row is
written after them (:meth:`ml_backend.registry.Registry.add`), so no replica ever sees a
version whose files are incomplete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigurationError

LOCAL_CACHE = Path("cache") / "artifacts"  # under LOOPSCRIBE_HOME: where this machine keeps remote artifacts


class ArtifactStore:
    def __init__(self, url: str, cache: Path):
        """``url``: the artifacts' root (a path or an fsspec URL); ``cache``: where remote files are kept locally."""
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ConfigurationError(f"ARTIFACTS_URL {url!r} cannot be opened: {exc} (for s3:// install s3fs: "
                                     "pip install 'loopscribe[s3]')") from exc
        self.root = root.rstrip("/")
        self.remote = not isinstance(self.fs, LocalFileSystem)
        self.cache = Path(cache)

    def put_dir(self, source: Path, key: str) -> None:
        """Store the folder ``source`` under ``key`` (e.g. ``versions/V/adapter``), replacing what a crash left."""
        if not self.remote:
            target = Path(self.root) / key
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                shutil.copytree(source, tmp / "files")
                shutil.rmtree(target, ignore_errors=True)
                (tmp / "files").rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
            self.fs.put_file(str(path), f"{self.root}/{key}/{path.relative_to(source).as_posix()}")

    def put_file(self, source: Path, key: str) -> None:
        """Store one file under ``key``; on a local store through a temporary name, so readers never see half."""
        target = f"{self.root}/{key}"
        if self.remote:
            self.fs.put_file(str(source), target)
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{target}.{os.getpid()}.part")
        shutil.copyfile(source, tmp)
        tmp.replace(target)

    def get_file(self, key: str, target: Path) -> bool:
        """Copy the file stored under ``key`` to ``target``; False when there is none."""
        try:
            self.fs.get_file(f"{self.root}/{key}", str(target))
        except FileNotFoundError:
            return False
        return True

    def local_dir(self, key: str) -> Path:
        """The folder ``key`` on this machine: in place when local, else downloaded into the cache once."""
        if not self.remote:
            return Path(self.root) / key
        target = self.cache / key
        if target.is_dir():
            return target
        files = self.fs.find(f"{self.root}/{key}")
        if not files:
            return target  # nothing stored: the caller's loader reports the missing adapter
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            prefix = f"{self.root}/{key}/"
            for remote in files:
                local = tmp / remote.removeprefix(prefix)
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(local))
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished the same download first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
