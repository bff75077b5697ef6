"""The static-shape decoder with continuous batching against the decoder it replaced.

``reference_decoding`` is the previous decoder, frozen: a plain loop over Hugging Face's
decoder with a growing KV cache and the rules applied row by row. Greedy decoding must
give the same tokens token for token, on tiny random models (every shape and rule path,
float64 so that batching cannot flip a near-tie) and on the real Whisper base over the
shared recordings and the espeak-ng set.
"""

from __future__ import annotations

from typing import Any

import pytest
import reference_decoding as reference
import torch

from ml_backend.audio import split_at_pauses
from ml_backend.decoding import DecodeRequest, DecodeResult, WhisperDecoder

EOT_BIAS = 0.6  # on a random tiny Whisper: some windows end early, others run to the length limit
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_whisper(dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=51865, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=1500,
                           max_target_positions=448, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257,
                           decoder_start_token_id=50258)
    with torch.device(device):
        model: Any = WhisperForConditionalGeneration(config)
    bias = torch.zeros(config.vocab_size, device=device)
    bias[50257] = EOT_BIAS  # made here: a hook may not copy from the host while a CUDA graph is captured
    model.proj_out.register_forward_hook(lambda module, inputs, logits: logits + bias.to(logits.dtype))
    return model.to(dtype).eval()


def special():
    from loopscribe.bench.shapes import special_tokens

    return special_tokens(51865)


def features(n: int, seed: int = 1) -> torch.Tensor:
    """A steady random spectrum per window (plain noise averages out in cross-attention: every window
    would then decode alike)."""
    generator = torch.Generator().manual_seed(seed)
    steady = (torch.randn(n, 80, 1, generator=generator) * 3).expand(n, 80, 3000)
    return steady + 0.1 * torch.randn(n, 80, 3000, generator=generator)


def decode_new(decoder: WhisperDecoder, feats: torch.Tensor, **kwargs) -> dict[int, DecodeResult]:
    results: dict[int, DecodeResult] = {}

    def keep(result: DecodeResult) -> list[DecodeRequest]:
        results[result.request.tag] = result
        return []

    decoder.run([DecodeRequest(features=f, tag=i) for i, f in enumerate(feats)], keep, **kwargs)
    return results


def decode_reference(model, feats: torch.Tensor, timestamps: bool, batch: int = 8, suppress=(), begin=()):
    old = reference.WhisperDecoder(model, special(), list(suppress), list(begin))
    out = []
    for b in range(0, len(feats), batch):
        encoded = old.encode(feats[b:b + batch])
        languages = [p.best()[0] for p in old.detect_language(encoded)]
        prompts = [old.prompt(code, "transcribe", timestamps) for code in languages]
        out += list(zip(languages, old.decode(encoded, prompts, timestamps=timestamps)))
    return out


def assert_same(reference_out, new_out: dict[int, DecodeResult]) -> None:
    assert len(reference_out) == len(new_out)
    for i, (language, sequence) in enumerate(reference_out):
        got = new_out[i]
        assert got.language == language, i
        assert got.sequence.tokens == sequence.tokens, (i, sequence.tokens, got.sequence.tokens)
        assert got.sequence.finished == sequence.finished
        assert got.sequence.entropies == pytest.approx(sequence.entropies, abs=1e-4)
        assert got.sequence.logprobs == pytest.approx(sequence.logprobs, abs=1e-4)


@pytest.mark.parametrize("timestamps,attention", [(True, "sdpa"), (False, "sdpa"), (True, "cudnn"),
                                                  (True, "matmul"), (True, "reduce")])
def test_tokens_identical_to_the_reference_decoder_on_random_weights(timestamps, attention):
    model = tiny_whisper()
    feats = features(10)
    suppress, begin = [220, 50256], [220]
    new = WhisperDecoder(model, special(), suppress, begin, slots=3, attention=attention)
    expected = decode_reference(model, feats, timestamps, suppress=suppress, begin=begin)
    assert any(len(s.tokens) > 5 for _, s in expected) and len({tuple(s.tokens) for _, s in expected}) > 5
    if timestamps:  # the rules were exercised, and the end
        assert sum(t >= special().timestamp_begin for _, s in expected for t in s.tokens) > 50
        assert any(s.finished for _, s in expected) and not all(s.finished for _, s in expected)
    assert_same(expected, decode_new(new, feats, timestamps=timestamps))


def test_slot_count_does_not_change_tokens():
    model = tiny_whisper()
    feats = features(7, seed=2)
    runs = [decode_new(WhisperDecoder(model, special(), [], [], slots=slots), feats) for slots in (1, 3, 7)]
    for other in runs[1:]:
        assert [other[i].sequence.tokens for i in range(7)] == [runs[0][i].sequence.tokens for i in range(7)]


def test_a_sampled_window_draws_the_same_tokens_whatever_shares_its_batch():
    model = tiny_whisper()
    feats = features(5, seed=2)
    lengths = [12, 20, 6, 16, 9]  # sampled rows rarely say <|endoftext|>: bounded, and finishing apart

    def decode(slots: int, order: list[int], temperature: float = 1.0, seed: int = 100) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {}

        def keep(result: DecodeResult) -> list[DecodeRequest]:
            got[result.request.tag] = result.sequence.tokens
            return []

        requests = [DecodeRequest(features=feats[i], temperature=temperature, seed=seed + i, tag=i,
                                  forced_length=lengths[i]) for i in order]
        WhisperDecoder(model, special(), [], [], slots=slots).run(requests, keep)
        return got

    alone = decode(1, list(range(5)))
    greedy = decode(1, list(range(5)), temperature=0.0)
    assert sum(alone[i] != greedy[i] for i in range(5)) >= 4  # it did sample
    assert decode(2, list(range(5))) == alone and decode(5, [4, 2, 0, 1, 3]) == alone
    assert decode(1, list(range(5)), seed=7)[0] != alone[0]  # another seed, other draws


def test_languages_are_restricted_and_follow_ups_are_decoded():
    model = tiny_whisper()
    feats = features(4, seed=3)
    decoder = WhisperDecoder(model, special(), [], [], slots=2)
    seen: list[tuple[str | None, float]] = []

    def again_once(result: DecodeResult) -> list[DecodeRequest]:
        seen.append((result.language, result.request.temperature))
        if result.request.temperature == 0.0 and result.request.tag == 0:
            return [DecodeRequest(features=result.request.features, temperature=1.0, tag=0)]
        return []

    decoder.run([DecodeRequest(features=f, tag=i) for i, f in enumerate(feats)], again_once,
                languages=["de", "fr"])
    assert len(seen) == 5 and {t for _, t in seen} == {0.0, 1.0}
    assert {code for code, _ in seen} <= {"de", "fr"}


def test_forced_length_decodes_exactly_that_many_tokens():
    model = tiny_whisper()
    decoder = WhisperDecoder(model, special(), [], [], slots=2)
    lengths = [3, 17, 1, 40]
    got: dict[int, int] = {}
    requests = [DecodeRequest(features=f, tag=i, forced_length=n) for i, (f, n) in enumerate(zip(features(4), lengths))]
    decoder.run(requests, lambda r: got.__setitem__(r.request.tag, len(r.sequence.tokens)) or [])
    assert [got[i] for i in range(4)] == lengths


@pytest.mark.slow
def test_tokens_identical_to_the_reference_decoder_on_real_speech(settings, shared_audio, transcripts, espeak_dir):
    """Whisper base in float32 (bf16 rounds differently in any two orders of the same sums), greedy, on every
    window of the shared recordings and of the espeak-ng set."""
    from dataclasses import replace

    from loopscribe.bench.synth import espeak_clips
    from ml_backend.audio import decode_audio
    from ml_backend.engine import WhisperEngine

    engine = WhisperEngine(replace(settings, dtype="float32"), "base")

    paths = [shared_audio / name for name in transcripts] + [c.path for c in espeak_clips(espeak_dir, 1)]
    clips = [decode_audio(p) for p in paths]
    windows = [c[a:b] for c in clips for a, b in split_at_pauses(c)]
    feats = engine.feature_extractor(windows, sampling_rate=16000, return_tensors="pt").input_features
    config = engine.model.config
    expected = decode_reference(engine.model, feats, True, suppress=config.suppress_tokens,
                                begin=config.begin_suppress_tokens)
    assert_same(expected, decode_new(engine.decoder, feats, timestamps=True))


@cuda
@pytest.mark.parametrize("attention", ["sdpa", "cudnn", "matmul", "reduce"])
def test_cuda_graph_replay_gives_the_eager_steps_tokens(attention):
    model = tiny_whisper(torch.bfloat16, "cuda")
    feats = features(12, seed=4)
    runs = [decode_new(WhisperDecoder(model, special(), [], [], slots=5, cuda_graphs=g, attention=attention), feats)
            for g in (True, False)]
    assert [runs[0][i].sequence.tokens for i in range(12)] == [runs[1][i].sequence.tokens for i in range(12)]


@cuda
@pytest.mark.parametrize("timestamps,attention", [(True, "sdpa"), (False, "sdpa"), (True, "cudnn"),
                                                  (True, "matmul"), (True, "reduce")])
def test_tokens_identical_to_the_reference_decoder_on_cuda(timestamps, attention):
    model = tiny_whisper(torch.float32, "cuda")
    feats = features(10)
    expected = decode_reference(model, feats, timestamps)
    decoder = WhisperDecoder(model, special(), [], [], slots=4, attention=attention)
    assert_same(expected, decode_new(decoder, feats, timestamps=timestamps))


@cuda
def test_matmul_attention_scores_half_precision_in_float32():
    """bf16 keys and queries, float32 scores: the same attention as float32 inputs up to bf16's rounding of
    the weighted sum, and closer to it than scores rounded to bf16 first."""
    from ml_backend.decode_step import half_scores_in_fp32, one_query_attention

    assert half_scores_in_fp32(torch.device("cuda"), torch.bfloat16)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(8, 4, n, 64, device="cuda", generator=generator) for n in (1, 1500, 1500))
    q = q * 3  # peaked attention, where rounded scores hurt
    exact = one_query_attention(q, k, v, kind="matmul")
    half = [one_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kind="matmul", fp32_scores=fp32).float()
            for fp32 in (True, False)]
    ours, rounded = ((h - exact).abs().mean() for h in half)
    assert ours < rounded


@cuda
@pytest.mark.parametrize("kind", ["sdpa", "cudnn", "matmul", "reduce"])
def test_each_attention_form_in_bf16_is_float32_attention_up_to_rounding(kind):
    """At a cross-attention's shape (1 500 keys of 64): every form, in bf16, as close to float32 attention as
    bf16's rounding of the inputs and the result allows."""
    from ml_backend.decode_step import one_query_attention

    generator = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(8, 4, n, 64, device="cuda", generator=generator) for n in (1, 1500, 1500))
    exact = one_query_attention(q * 0.5, k, v, kind="matmul")
    half = one_query_attention((q * 0.5).bfloat16(), k.bfloat16(), v.bfloat16(), kind=kind)
    assert half.dtype == torch.bfloat16 and half.shape == exact.shape
    error = (half.float() - exact).abs()
    assert error.mean() < 0.01 and error.max() < 0.1  # on a CPU: 0.002-0.005 and 0.024-0.032
