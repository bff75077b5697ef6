"""All settings in one typed place: environment variables → :class:`Settings`.

Every component reads its configuration from here, so the README's configuration
reference, ``.env`` and ``docker-compose.yml`` all name the same variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigurationError

LEDGER_FILE = "ledger.db"  # the embedded ledger in LOOPSCRIBE_HOME when DATABASE_URL is empty


def _default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "loopscribe"


def _flag(value: str) -> bool:
    return value.lower() in {"1", "true", "yes", "on"}


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _url(value: str) -> str:
    return value.rstrip("/")


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError("expected a number above 0 and at most 1")
    return number


def unit_share(number: float) -> float:
    """A share in [0, 1] (TRAIN_TIMESTAMPED_SHARE, LoraArguments.timestamped_share): ValueError outside it."""
    if not 0 <= number <= 1:
        raise ValueError("expected a share from 0 to 1")
    return number


def _share(value: str) -> float:
    return unit_share(float(value))


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def speed_share(share: float) -> float:
    """A speed perturbation share (TRAIN_SPEED_PERTURB, LoraArguments.speed_perturb): ValueError outside [0, 0.5)."""
    if not 0 <= share < 0.5:
        raise ValueError("must be at least 0 and below 0.5 (a share of the speed: 0.1 plays at 0.9, 1.0 or 1.1)")
    return share


def _speed_share(value: str) -> float:
    return speed_share(float(value))


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value
    return parse


def setting(default: Any, env: str, help: str, *, secret: bool = False, parse: Callable[[str], Any] | None = None,
            group: str = "serving") -> Any:
    """A settings field: its environment variable, one line of help, and how to parse it."""
    if parse is None:
        parsers: dict[type, Callable[[str], Any]] = {bool: _flag, int: int, float: float, tuple: _names}
        parse = parsers.get(type(default), str)
    meta = {"env": env, "help": help, "secret": secret, "parse": parse, "group": group}
    if callable(default) and not isinstance(default, (str, tuple)):
        return field(default_factory=default, repr=not secret, metadata=meta)
    return field(default=default, repr=not secret, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Typed view of the environment. Construct with :meth:`from_env`; see :meth:`reference`."""

    home: Path = setting(_default_home, "LOOPSCRIBE_HOME", "data root: models, registry, ledger, caches, job queue",
                         parse=lambda v: Path(v).expanduser(), group="paths")
    whisper_model: str = setting("base", "WHISPER_MODEL", "bundled name (`base`, `tiny.en`), a local Whisper "
                                 "directory, or a hub id (only when online)", group="model")
    device: str = setting("auto", "WHISPER_DEVICE", "`auto` (CUDA when present), `cuda` or `cpu`", group="model")
    dtype: str = setting("auto", "WHISPER_DTYPE", "`auto`: bf16 (fp16) on GPU; on CPU bf16 where it multiplies "
                         "bf16 natively (AMX, AVX-512 BF16), else fp32, and fp32 for CPU training; or `float32`, "
                         "`float16`, `bfloat16`", group="model")
    batch_size: int = setting(0, "WHISPER_BATCH_SIZE", "windows (≤30 s) decoded together; 0: 8 on CPU, as many as "
                              "fit in 60 % of the free memory on a GPU (up to 256)", group="model")
    quantize: bool = setting(False, "WHISPER_QUANTIZE", "dynamic int8 quantization of Linear layers on CPU "
                             "(faster; check WER with `loopscribe bench engine`)", group="model")
    cpu_threads: int = setting(0, "WHISPER_CPU_THREADS", "torch intra-op threads on CPU; 0 keeps torch's default",
                               group="model")
    serve_adapters: str = setting("shared", "SERVE_ADAPTERS", "`shared`: one base model in memory, each live "
                                  "project's LoRA adapter beside it (a few MiB per project); `merged`: one model per "
                                  "live version with its adapter merged in (a full model each; quantized CPU serving "
                                  "always merges)", parse=_choice("shared", "merged"), group="model")
    live_models_max: int = setting(3, "LIVE_MODELS_MAX", "whole models a backend or worker keeps loaded at once "
                                   "(base models, or merged ones with SERVE_ADAPTERS=merged); least recently used "
                                   "unloaded first", group="model")
    unsure_word_probability: float = setting(0.5, "UNSURE_WORD_PROBABILITY", "each stretch of words less probable "
                                             "than this becomes a region to listen to (with a Label aliased "
                                             "`unsure` in the label config); 0 predicts none", group="model")
    cache_size: int = setting(2048, "WHISPER_CACHE_SIZE", "transcriptions kept in memory, keyed by audio hash + "
                              "model version + options", group="model")

    label_studio_url: str = setting("http://127.0.0.1:8080", "LABEL_STUDIO_URL", "where the backend and worker "
                                    "reach Label Studio (audio, predictions, exports)", parse=_url)
    label_studio_api_key: str = setting("", "LABEL_STUDIO_API_KEY", "the backend's Label Studio token (legacy "
                                        "token or personal access token)", secret=True)
    basic_auth_user: str = setting("", "BASIC_AUTH_USER", "with BASIC_AUTH_PASS: the backend requires HTTP basic "
                                   "auth (Label Studio sends it)")
    basic_auth_pass: str = setting("", "BASIC_AUTH_PASS", "password for BASIC_AUTH_USER", secret=True)
    webhook_secret: str = setting("", "WEBHOOK_SECRET", "when set, /webhook requires header "
                                  "`X-Loopscribe-Secret` with this value", secret=True)
    allowed_audio_hosts: tuple[str, ...] = setting((), "ALLOWED_AUDIO_HOSTS", "comma-separated hosts task audio "
                                                   "may come from; Label Studio's own host is always allowed")
    max_audio_bytes: int = setting(200 * 1024 * 1024, "MAX_AUDIO_BYTES", "larger task audio is refused")
    max_audio_seconds: float = setting(3600.0, "MAX_AUDIO_SECONDS", "longer task audio is refused")
    backend_url: str = setting("http://127.0.0.1:9090", "BACKEND_URL", "where Label Studio reaches the ML backend "
                               "(and its /webhook)", parse=_url)
    backend_threads: int = setting(16, "BACKEND_THREADS", "gunicorn threads of the backend; requests beyond "
                                   "MAX_CONCURRENT_PREDICTS keep the rest free for /health, /setup and webhooks",
                                   group="limits")
    max_concurrent_predicts: int = setting(8, "MAX_CONCURRENT_PREDICTS", "/predict requests served at once (they "
                                           "share one model); more are answered 503 with Retry-After",
                                           group="limits")
    max_request_bytes: int = setting(10 * 1024 * 1024, "MAX_REQUEST_BYTES", "larger request bodies are refused "
                                     "(413) by the proxy and the backend", group="limits")
    max_tasks_per_request: int = setting(100, "MAX_TASKS_PER_REQUEST", "tasks in one /predict call (Label Studio "
                                         "waits 100 s); bulk work goes through `loopscribe predict`",
                                         group="limits")
    ffmpeg_timeout: float = setting(120.0, "FFMPEG_TIMEOUT", "seconds one audio decode may take before it is "
                                    "killed and the task reported", group="limits")
    client_timeout: int = setting(10, "CLIENT_TIMEOUT", "seconds the reverse proxy waits for a client's "
                                    "request headers, and between two reads of its body", group="limits")
    webhook_max_future_seconds: float = setting(3600.0, "WEBHOOK_MAX_FUTURE_SECONDS", "a webhook whose "
                                                "`updated_at` lies further in the future is refused (400)",
                                                group="limits")
    database_url: str = setting("", "DATABASE_URL", "the ledger (corrections, jobs, splits, the registry's versions "
                                "and live pointers) on a database server shared by every replica and worker, e.g. "
                                "postgresql://user:pass@host/loopscribe; empty: SQLite in LOOPSCRIBE_HOME (one "
                                "machine)", secret=True, group="training")
    artifacts_url: str = setting("", "ARTIFACTS_URL", "where adapters are stored, and decoded training audio shared "
                                 "between machines, any fsspec URL (s3://bucket/prefix needs s3fs; credentials and "
                                 "endpoint from the usual AWS_* variables); empty: LOOPSCRIBE_HOME/registry (one "
                                 "machine)", group="training")
    redis_url: str = setting("", "REDIS_URL", "job queue on Redis (workers on several machines); empty: SQLite "
                             "queue in LOOPSCRIBE_HOME (one machine)", secret=True, group="training")

    retrain_min_corrections: int = setting(50, "RETRAIN_MIN_CORRECTIONS", "corrections since the last training "
                                           "that queue a job (0: only on request)", group="training")
    promote_min_gain: float = setting(0.01, "PROMOTE_MIN_GAIN", "a candidate goes live only if its held-out error "
                                      "rate is lower by at least this (absolute)", group="training")
    promote_confidence: float = setting(0.95, "PROMOTE_CONFIDENCE", "… and better with this confidence (one-sided "
                                        "paired bootstrap over held-out utterances); otherwise: not enough evidence",
                                        group="training")
    regression_audio: str = setting("", "REGRESSION_AUDIO", "folders (comma-separated) of general real recordings "
                                    "with `transcripts.json`; a candidate may not be worse on those in its "
                                    "project's languages (`up` and compose: the bundled LJ Speech set "
                                    "`data/regression-en`, plus the shared recordings when present)",
                                    group="training")
    regression_max_increase: float = setting(0.005, "REGRESSION_MAX_INCREASE", "largest rise of the regression "
                                             "set's error rate a candidate may cause (0.005 = half a point)",
                                             group="training")
    regression_retry_strength: float = setting(0.5, "REGRESSION_RETRY_STRENGTH", "a candidate better on held-out "
                                               "tasks but over that margin on general speech is tried once more "
                                               "with its LoRA update scaled by this (0.5: halfway back to the "
                                               "base; 1: no retry)", parse=_fraction, group="training")
    heldout_fraction: float = setting(0.2, "HELDOUT_FRACTION", "share of annotated tasks frozen into the held-out "
                                      "split (by a hash of project and task id)", group="training")
    heldout_ahead: float = setting(0.05, "HELDOUT_AHEAD", "share of the project's tasks, all held out, that "
                                   "`/next` serves first (by hash, not by difficulty), so the gate's sample "
                                   "represents the project; the rest of the held-out split comes after the pool",
                                   group="training")
    heldout_ahead_tasks: int = setting(30, "HELDOUT_AHEAD_TASKS", "… but exactly this many tasks when that is more "
                                       "(the held-out tasks of lowest hash among the project's task ids; all of the "
                                       "held-out split in a project too small for that), so a small project's gate "
                                       "has a real sample after its first job", group="training")
    heldout_min_items: int = setting(4, "HELDOUT_MIN_ITEMS", "fewer held-out items than this and no candidate is "
                                     "promoted (nothing to measure)", group="training")
    lora_r: int = setting(32, "LORA_R", "LoRA rank (peft's Whisper recipe: 32)", group="training")
    lora_alpha: int = setting(64, "LORA_ALPHA", "LoRA scaling (recipe: 64)", group="training")
    lora_dropout: float = setting(0.05, "LORA_DROPOUT", "dropout on the LoRA path (recipe: 0.05)", group="training")
    lora_target_modules: tuple[str, ...] = setting(("q_proj", "v_proj"), "LORA_TARGET_MODULES", "comma-separated "
                                                   "module names that get adapters (recipe: q_proj,v_proj)",
                                                   group="training")
    lora_encoder: bool = setting(True, "LORA_ENCODER", "adapt the encoder too (accents, noise: learned more on real "
                                 "accented speech); off: decoder only, its output cached, 3-6x faster training on "
                                 "CPU", group="training")
    lora_encoder_layers: int = setting(0, "LORA_ENCODER_LAYERS", "with LORA_ENCODER: adapt only the top N encoder "
                                       "layers (0: all); the frozen layers below run once per utterance, not at "
                                       "every step (base, top 3: 0.54x the step time on CPU)", parse=_count,
                                       group="training")
    train_epochs: int = setting(3, "TRAIN_EPOCHS", "passes over the training split (3: as much learned on real "
                                "accented speech as 5, in about half the time; README, Benchmarks)", group="training")
    train_max_steps: int = setting(40, "TRAIN_MAX_STEPS", "at most this many optimizer steps a job, however many "
                                   "corrections the project has (the epochs end early): a job's time stays bounded, "
                                   "and on real accented speech 40 learned as much as no limit, in 0.6x the time at "
                                   "200 annotations (README, Benchmarks); 0: no limit",
                                   parse=_count, group="training")
    train_warm_start: bool = setting(False, "TRAIN_WARM_START", "start each job's adapter from the project's live "
                                     "adapter (same rank and modules) instead of a fresh one; it still trains on "
                                     "all the corrections", group="training")
    train_spec_augment: bool = setting(False, "TRAIN_SPEC_AUGMENT", "mask two random mel bands and two short time "
                                       "spans of every training utterance at every step (SpecAugment); only where the "
                                       "whole encoder trains (LORA_ENCODER=1, all layers)", group="training")
    train_speed_perturb: float = setting(0.0, "TRAIN_SPEED_PERTURB", "speed perturbation: play each training "
                                         "utterance at every step at 1 - s, 1 or 1 + s times its speed (tempo "
                                         "and pitch, as another voice would; s = 0.1: Kaldi's 0.9/1.0/1.1); 0: "
                                         "off (on speechocean762 0.1 learned no more: README, Benchmarks); only "
                                         "where the whole encoder trains (LORA_ENCODER=1, all layers)",
                                         parse=_speed_share, group="training")
    train_timestamped_share: float = setting(1.0, "TRAIN_TIMESTAMPED_SHARE", "share of the corrections trained "
                                             "with a timestamp pair (the mode the engine decodes in), the rest without "
                                             "timestamps; 1: all (on speechocean762 the loop learned more than at 0.5: "
                                             "README, Benchmarks); lower it if you also decode without timestamps",
                                             parse=_share,
                                             group="training")
    train_learning_rate: float = setting(1e-3, "TRAIN_LEARNING_RATE", "AdamW learning rate (recipe: 1e-3), linear "
                                         "decay after warm-up", group="training")
    train_batch_size: int = setting(8, "TRAIN_BATCH_SIZE", "utterances per optimizer step", group="training")
    train_processes: int = setting(0, "TRAIN_PROCESSES", "data-parallel training processes under `accelerate launch` "
                                   "(DDP); 0: one per GPU when the worker has several, else 1; more than 1 on a CPU "
                                   "splits each batch over CPU processes (gloo)", group="training")
    worker_gpu: str = setting("", "WORKER_GPU", "which GPUs a worker uses: empty = every visible one (training "
                              "spans them, see TRAIN_PROCESSES); `claim` = one of them, the one fewest workers on "
                              "this machine hold (so `--scale worker=N` spreads N workers over the GPUs); or a "
                              "CUDA_VISIBLE_DEVICES list (`1`, `0,1`, a GPU UUID)", group="training")
    train_max_attempts: int = setting(2, "TRAIN_MAX_ATTEMPTS", "a job whose worker died is run again until this many "
                                      "attempts, then failed with the reason", group="training")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def ledger_url(self) -> str:
        """Where the ledger lives: ``DATABASE_URL``, else ``ledger.db`` in ``LOOPSCRIBE_HOME``."""
        return self.database_url or str(self.home / LEDGER_FILE)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Each field from its environment variable; unset or empty keeps the default."""
        source: Mapping[str, str] = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = source.get(f.metadata["env"])
            if raw is not None and raw != "":
                try:
                    values[f.name] = f.metadata["parse"](raw)
                except ValueError as exc:
                    raise ConfigurationError(f"{f.metadata['env']}={raw!r} is not valid: {exc}") from None
        return cls(**values)

    @classmethod
    def reference(cls) -> list[dict[str, str]]:
        """Every setting: environment variable, default, meaning, group (the README's reference table)."""
        rows = []
        for f in fields(cls):
            default = _default_of(f)
            if isinstance(default, tuple):
                default = ",".join(default)
            elif isinstance(default, bool):
                default = "1" if default else "0"
            rows.append({"env": f.metadata["env"], "default": str(default), "help": f.metadata["help"],
                         "group": f.metadata["group"], "secret": f.metadata["secret"]})
        return rows

    @classmethod
    def env_names(cls) -> list[str]:
        return [f.metadata["env"] for f in fields(cls)]

    def describe(self) -> dict[str, str]:
        """Settings as printable strings, secrets masked."""
        return {
            f.name: ("***" if getattr(self, f.name) else "") if f.metadata["secret"] else str(getattr(self, f.name))
            for f in fields(self)
        }


def _default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.name == "home":
        return "$XDG_DATA_HOME/loopscribe (~/.local/share/loopscribe)"
    return f.default_factory()  # type: ignore[operator]
