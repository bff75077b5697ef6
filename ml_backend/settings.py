"""All settings in one typed place: environment variables → :class:`Settings`.

Every component reads its configuration from here, so the README's configuration
reference, ``.env`` and ``docker-compose.yml`` all name the same variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "loopscribe"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


@dataclass(frozen=True)
class Settings:
    """Typed view of the environment. Construct with :meth:`from_env`."""

    home: Path = field(default_factory=_default_home)
    """LOOPSCRIBE_HOME: data root (models, caches, ledgers)."""
    whisper_model: str = "base"
    """WHISPER_MODEL: bundled name (``base``, ``tiny.en``), a local Whisper directory, or a hub id."""
    device: str = "auto"
    """WHISPER_DEVICE: ``auto`` (CUDA when present), ``cuda`` or ``cpu``."""
    dtype: str = "auto"
    """WHISPER_DTYPE: ``auto`` (bf16/fp16 on GPU, fp32 on CPU), ``float32``, ``float16``, ``bfloat16``."""
    batch_size: int = 8
    """WHISPER_BATCH_SIZE: utterances (≤30 s windows) decoded together."""
    quantize: bool = False
    """WHISPER_QUANTIZE: dynamic int8 quantization of Linear layers on CPU (faster; check WER)."""
    cpu_threads: int = 0
    """WHISPER_CPU_THREADS: torch intra-op threads on CPU; 0 keeps torch's default."""
    cache_size: int = 2048
    """WHISPER_CACHE_SIZE: transcriptions kept in memory, keyed by audio hash + model version + options."""

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @classmethod
    def from_env(cls) -> "Settings":
        defaults = cls()
        return cls(
            home=Path(_env("LOOPSCRIBE_HOME", str(defaults.home))).expanduser(),
            whisper_model=_env("WHISPER_MODEL", defaults.whisper_model),
            device=_env("WHISPER_DEVICE", defaults.device),
            dtype=_env("WHISPER_DTYPE", defaults.dtype),
            batch_size=int(_env("WHISPER_BATCH_SIZE", str(defaults.batch_size))),
            quantize=_env("WHISPER_QUANTIZE", "0").lower() in {"1", "true", "yes", "on"},
            cpu_threads=int(_env("WHISPER_CPU_THREADS", str(defaults.cpu_threads))),
            cache_size=int(_env("WHISPER_CACHE_SIZE", str(defaults.cache_size))),
        )

    def describe(self) -> dict[str, str]:
        """Settings as printable strings (no secrets live here)."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}
