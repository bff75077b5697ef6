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


def _flag(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").lower() in {"1", "true", "yes", "on"}


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

    label_studio_url: str = "http://127.0.0.1:8080"
    """LABEL_STUDIO_URL: where the backend fetches task audio and pushes predictions."""
    label_studio_api_key: str = field(default="", repr=False)
    """LABEL_STUDIO_API_KEY: the backend's own token (legacy token or personal access token)."""
    basic_auth_user: str = ""
    """BASIC_AUTH_USER: when set with BASIC_AUTH_PASS, the backend requires HTTP basic auth."""
    basic_auth_pass: str = field(default="", repr=False)
    """BASIC_AUTH_PASS."""
    webhook_secret: str = field(default="", repr=False)
    """WEBHOOK_SECRET: when set, /webhook requires header ``X-Loopscribe-Secret`` with this value."""
    allowed_audio_hosts: tuple[str, ...] = ()
    """ALLOWED_AUDIO_HOSTS: comma-separated hosts audio may come from; Label Studio's host is always allowed."""
    max_audio_bytes: int = 200 * 1024 * 1024
    """MAX_AUDIO_BYTES: larger task audio is refused."""
    max_audio_seconds: float = 3600.0
    """MAX_AUDIO_SECONDS: longer task audio is refused."""
    backend_url: str = "http://127.0.0.1:9090"
    """BACKEND_URL: where Label Studio reaches this ML backend."""

    retrain_min_corrections: int = 50
    """RETRAIN_MIN_CORRECTIONS: corrections since the last training that queue a job (0: only on request)."""
    promote_min_gain: float = 0.01
    """PROMOTE_MIN_GAIN: a candidate goes live only if its held-out error rate is lower by at least this (absolute)."""
    heldout_fraction: float = 0.2
    """HELDOUT_FRACTION: share of annotated tasks frozen into the held-out split (by a hash of the task id)."""
    heldout_min_items: int = 4
    """HELDOUT_MIN_ITEMS: fewer held-out items than this and no candidate is promoted (nothing to measure)."""
    lora_r: int = 32
    """LORA_R: LoRA rank (peft's Whisper recipe: 32)."""
    lora_alpha: int = 64
    """LORA_ALPHA: LoRA scaling (recipe: 64)."""
    lora_dropout: float = 0.05
    """LORA_DROPOUT: dropout on the LoRA path (recipe: 0.05)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """LORA_TARGET_MODULES: comma-separated module names that get adapters (recipe: q_proj,v_proj)."""
    lora_encoder: bool = False
    """LORA_ENCODER: adapt the encoder too (acoustics: accents, noise); off = decoder only, 5-10x faster on CPU."""
    train_epochs: int = 5
    """TRAIN_EPOCHS: passes over the training split."""
    train_learning_rate: float = 1e-3
    """TRAIN_LEARNING_RATE: AdamW learning rate (recipe: 1e-3), linear decay after warm-up."""
    train_batch_size: int = 8
    """TRAIN_BATCH_SIZE: utterances per optimizer step."""
    train_max_attempts: int = 2
    """TRAIN_MAX_ATTEMPTS: a job whose worker died is run again until this many attempts, then failed."""

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.db"

    @classmethod
    def from_env(cls) -> "Settings":
        defaults = cls()
        return cls(
            home=Path(_env("LOOPSCRIBE_HOME", str(defaults.home))).expanduser(),
            whisper_model=_env("WHISPER_MODEL", defaults.whisper_model),
            device=_env("WHISPER_DEVICE", defaults.device),
            dtype=_env("WHISPER_DTYPE", defaults.dtype),
            batch_size=int(_env("WHISPER_BATCH_SIZE", str(defaults.batch_size))),
            quantize=_flag("WHISPER_QUANTIZE", defaults.quantize),
            cpu_threads=int(_env("WHISPER_CPU_THREADS", str(defaults.cpu_threads))),
            cache_size=int(_env("WHISPER_CACHE_SIZE", str(defaults.cache_size))),
            label_studio_url=_env("LABEL_STUDIO_URL", defaults.label_studio_url).rstrip("/"),
            label_studio_api_key=_env("LABEL_STUDIO_API_KEY", ""),
            basic_auth_user=_env("BASIC_AUTH_USER", ""),
            basic_auth_pass=_env("BASIC_AUTH_PASS", ""),
            webhook_secret=_env("WEBHOOK_SECRET", ""),
            allowed_audio_hosts=tuple(h.strip() for h in _env("ALLOWED_AUDIO_HOSTS", "").split(",") if h.strip()),
            max_audio_bytes=int(_env("MAX_AUDIO_BYTES", str(defaults.max_audio_bytes))),
            max_audio_seconds=float(_env("MAX_AUDIO_SECONDS", str(defaults.max_audio_seconds))),
            backend_url=_env("BACKEND_URL", defaults.backend_url).rstrip("/"),
            retrain_min_corrections=int(_env("RETRAIN_MIN_CORRECTIONS", str(defaults.retrain_min_corrections))),
            promote_min_gain=float(_env("PROMOTE_MIN_GAIN", str(defaults.promote_min_gain))),
            heldout_fraction=float(_env("HELDOUT_FRACTION", str(defaults.heldout_fraction))),
            heldout_min_items=int(_env("HELDOUT_MIN_ITEMS", str(defaults.heldout_min_items))),
            lora_r=int(_env("LORA_R", str(defaults.lora_r))),
            lora_alpha=int(_env("LORA_ALPHA", str(defaults.lora_alpha))),
            lora_dropout=float(_env("LORA_DROPOUT", str(defaults.lora_dropout))),
            lora_target_modules=tuple(m.strip() for m in _env("LORA_TARGET_MODULES", ",".join(
                defaults.lora_target_modules)).split(",") if m.strip()),
            lora_encoder=_flag("LORA_ENCODER", defaults.lora_encoder),
            train_epochs=int(_env("TRAIN_EPOCHS", str(defaults.train_epochs))),
            train_learning_rate=float(_env("TRAIN_LEARNING_RATE", str(defaults.train_learning_rate))),
            train_batch_size=int(_env("TRAIN_BATCH_SIZE", str(defaults.train_batch_size))),
            train_max_attempts=int(_env("TRAIN_MAX_ATTEMPTS", str(defaults.train_max_attempts))),
        )

    def describe(self) -> dict[str, str]:
        """Settings as printable strings, secrets masked."""
        return {
            f.name: ("***" if getattr(self, f.name) else "") if not f.repr else str(getattr(self, f.name))
            for f in fields(self)
        }
