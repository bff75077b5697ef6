"""Whisper itself, decided once for serving and training: constants, the device and dtype, and loading.

The engine (:mod:`ml_backend.engine`) and the trainer (:mod:`training.lora`) both load the model
through :func:`load_whisper` and both ask :func:`pick_device` / :func:`pick_dtype`, so
``WHISPER_DEVICE`` and ``WHISPER_DTYPE`` mean the same thing everywhere.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .settings import Settings

if TYPE_CHECKING:
    from .decoding import SpecialTokens

log = logging.getLogger(__name__)

TIME_PRECISION = 0.02  # seconds per timestamp token
MAX_TIMESTAMP_INDEX = 1500  # <|30.00|>: timestamps index the 30 s window in 0.02 s steps
MULTILINGUAL_VOCAB_SIZE = 51865  # English-only (*.en) checkpoints have 51864 tokens


def is_multilingual(vocab_size: int) -> bool:
    return vocab_size >= MULTILINGUAL_VOCAB_SIZE


def pick_device(setting: str) -> torch.device:
    """``WHISPER_DEVICE``: ``auto`` (CUDA when present), ``cuda`` or ``cpu``."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX, or AVX-512 BF16): then oneDNN runs bf16 natively."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def pick_dtype(setting: str, device: torch.device, *, training: bool = False) -> torch.dtype:
    """``WHISPER_DTYPE``: ``auto`` is bf16 (fp16 where bf16 is missing) on CUDA. On a CPU it is bf16 for
    serving where the CPU multiplies bf16 natively (twice as fast as fp32 on an AMX CPU, at the same error:
    ``loopscribe bench engine``), else fp32; CPU training stays fp32 (its recipe was measured so)."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not training and cpu_multiplies_bf16():
        return torch.bfloat16
    return torch.float32


def quantizes(settings: Settings) -> bool:
    """Whether serving quantizes (``WHISPER_QUANTIZE`` applies on CPU only)."""
    return settings.quantize and pick_device(settings.device).type == "cpu"


def avoid_cudnn_attention() -> None:
    """Route scaled-dot-product attention away from cuDNN (to flash / memory-efficient kernels).

    PyTorch prefers cuDNN attention on Hopper in fp16/bf16, and cuDNN builds an execution plan
    for every new shape. Whisper decoding makes a new shape at every step (the KV cache grows)
    and every batch size, so the first pass over new audio ran 4.5x slower on an H100 (26.9 s
    against 6.0 s for 263 s of audio, batch 8) and the first LoRA epoch 2.9x slower; once every
    plan was cached both backends were as fast. Process-wide, so call it only on CUDA. The decoder's
    cross-attention asks for cuDNN by name (the ``cudnn`` form in :mod:`ml_backend.decode_step`): its shape never
    changes, so one plan serves every step, and there cuDNN was twice as fast as flash on an H200.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks transformers 5.x a deprecated question on every wrap; the FutureWarning is for peft, not users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@dataclass
class Whisper:
    """A loaded checkpoint: the model and what reads its inputs and outputs."""

    model: Any  # WhisperForConditionalGeneration (or a peft model around one)
    tokenizer: Any  # WhisperTokenizer
    feature_extractor: Any  # WhisperFeatureExtractor
    special: SpecialTokens


def load_whisper(path: str, *, dtype: torch.dtype = torch.float32, adapter: str | None = None,
                 attn_implementation: str | None = "sdpa") -> Whisper:
    """Load a Hugging Face Whisper directory (or hub id), with a LoRA ``adapter`` merged in when given."""
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    from transformers.utils import logging as hf_logging

    from .decoding import SpecialTokens

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise; our own bars show the work

    tokenizer = WhisperTokenizer.from_pretrained(path)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(path)
    model = (WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
             if attn_implementation else WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype))
    if adapter:
        from peft import PeftModel

        log.info("merging LoRA adapter %s", adapter)
        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    special = SpecialTokens.from_tokenizer(tokenizer, list(LANGUAGES), is_multilingual(model.config.vocab_size))
    return Whisper(model, tokenizer, feature_extractor, special)
