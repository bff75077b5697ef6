"""CTranslate2 → Hugging Face conversion: the binary reader, the name mapping, the real model."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from ml_backend.whisper_convert import ConversionError, map_to_hf, read_ct2_model


def _write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """Writer for CTranslate2's model.bin v6, from the layout in FACTS.md (independent of the reader)."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}

    def s(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = bytearray(struct.pack("<I", 6) + s("WhisperSpec") + struct.pack("<I", 3))
    out += struct.pack("<I", len(variables))
    for name, array in variables.items():
        array = np.asarray(array, order="C")  # keeps 0-d scalars 0-d, as CTranslate2 writes them
        out += s(name) + struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
        out += struct.pack("<B", codes[array.dtype]) + struct.pack("<I", array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += s(alias) + s(target)
    path.write_bytes(bytes(out))


def _to_ct2(sd: dict[str, torch.Tensor], layers: int, heads: int) -> dict[str, np.ndarray]:
    """HF state dict → CTranslate2 names (fused qkv rows, zero k bias), per the FACTS.md table."""
    def n(t):
        return t.detach().numpy().astype(np.float16)
    v: dict[str, np.ndarray] = {}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = n(sd[f"{src}.weight"])
        if bias:
            v[f"{dst}/bias"] = n(sd[f"{src}.bias"])

    def ln(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = n(sd[f"{src}.weight"]), n(sd[f"{src}.bias"])

    def fused(dst, srcs, no_bias):
        v[f"{dst}/weight"] = np.concatenate([n(sd[f"{s}.weight"]) for s in srcs])
        v[f"{dst}/bias"] = np.concatenate(
            [np.zeros(sd[f"{s}.weight"].shape[0], np.float16) if s in no_bias else n(sd[f"{s}.bias"]) for s in srcs])

    for c in ("conv1", "conv2"):
        lin(f"encoder/{c}", f"model.encoder.{c}")
    v["encoder/position_encodings/encodings"] = n(sd["model.encoder.embed_positions.weight"])
    v["decoder/position_encodings/encodings"] = n(sd["model.decoder.embed_positions.weight"])
    v["decoder/embeddings/weight"] = n(sd["model.decoder.embed_tokens.weight"])
    for stack in ("encoder", "decoder"):
        ln(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        v[f"{stack}/num_heads"] = np.array(heads, dtype=np.int16)
        for i in range(layers):
            d, s = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            qkv = [f"{s}.self_attn.{p}_proj" for p in "qkv"]
            fused(f"{d}/self_attention/linear_0", qkv, {qkv[1]})
            lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
            ln(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
            if stack == "decoder":
                lin(f"{d}/attention/linear_0", f"{s}.encoder_attn.q_proj")
                kv = [f"{s}.encoder_attn.{p}_proj" for p in "kv"]
                fused(f"{d}/attention/linear_1", kv, {kv[0]})
                lin(f"{d}/attention/linear_2", f"{s}.encoder_attn.out_proj")
                ln(f"{d}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
            lin(f"{d}/ffn/linear_0", f"{s}.fc1")
            lin(f"{d}/ffn/linear_1", f"{s}.fc2")
            ln(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
    return v


def test_reader_and_mapping_roundtrip_a_tiny_whisper(tmp_path):
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=96, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=10, max_target_positions=12,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2)
    model = WhisperForConditionalGeneration(config).half()
    sd = model.state_dict()
    _write_ct2(tmp_path / "model.bin", _to_ct2(sd, 2, 2), {"decoder/projection/weight": "decoder/embeddings/weight"})

    variables = read_ct2_model(tmp_path / "model.bin")
    assert int(variables["encoder/num_heads"]) == 2
    hf = map_to_hf(variables)
    expected = {k for k in sd if k != "proj_out.weight"}  # tied to the embeddings
    assert set(hf) == expected
    for name, array in hf.items():
        assert np.array_equal(array, sd[name].numpy()), name

    fresh = WhisperForConditionalGeneration(config).half()
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in hf.items()}, strict=False)
    assert missing == ["proj_out.weight"] and not unexpected
    assert torch.equal(fresh.proj_out.weight, sd["model.decoder.embed_tokens.weight"])


def test_reader_rejects_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "model.bin"
    _write_ct2(good, {"encoder/num_heads": np.array(2, np.int16), "w": np.ones((4, 4), np.float16)}, {})
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ConversionError, match="truncated"):
        read_ct2_model(truncated)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(struct.pack("<I", 5) + b"\0" * 20)
    with pytest.raises(ConversionError, match="version"):
        read_ct2_model(foreign)


@pytest.mark.slow
def test_converted_base_reconverts_bit_identically_with_ctranslate2(engine, tmp_path):
    """CTranslate2's own converter, run on our HF directory, gives back the packaged tensors."""
    import ctranslate2

    hf_dir, ct2_dir = Path(engine.resolved.path), Path(engine.resolved.ct2_path)
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(tmp_path / "ct2"), quantization="float16")
    original, again = read_ct2_model(ct2_dir / "model.bin"), read_ct2_model(tmp_path / "ct2" / "model.bin")
    weights = [k for k, v in original.items() if v.dtype == np.float16]
    assert len(weights) >= 200
    for name in weights:
        assert np.array_equal(original[name], again[name]), name
