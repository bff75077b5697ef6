"""``loopscribe bench engine --shape large-v3``: decoder throughput at a model's shapes, without its weights.

Random weights decode nonsense and stop at random places, so each window decodes exactly
the number of tokens real speech of its duration yields (``TOKENS_PER_SECOND``, plus a
timestamp pair), with every rule and uncertainty signal computed as when serving.
Windows are 2–30 s (uniform, seeded); audio seconds are the windows' durations. Rows:

- ``loopscribe``: this decoder, continuous batching, CUDA graphs, the attention it serves with (the serving path);
- ``loopscribe, no graphs``: the same, each step launched kernel by kernel;
- ``loopscribe, X attention``: the serving path with another attention form (``--attention X``);
- ``transformers generate``: the peer, batches of windows sorted by length, each batch
  decoding as long as its longest window (static batching), dynamic cache; and the same
  with a static cache and ``torch.compile(mode="reduce-overhead")`` (``--compile-peer``).

The peer computes no entropies (it is not asked for scores).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .train import shape_dimensions

# Text tokens per second of audio: at the high end of what the reference transcripts here give (speechocean762
# train 1.57, the JFK clip 2.27, the ComfyUI talk 3.95), so every engine decodes at least as much as real speech needs
TOKENS_PER_SECOND = 4.0
FIRST_LANGUAGE_ID = 50259  # <|en|>; the language tokens follow <|startoftranscript|> on every multilingual vocab


@dataclass
class ShapeRow:
    engine: str
    shape: str
    batch_size: int
    windows: int
    audio_seconds: float
    tokens: int
    wall_seconds: float
    peak_memory_mb: float | None

    @property
    def speed(self) -> float:
        return self.audio_seconds / self.wall_seconds


def random_whisper(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig.from_dict({**shape_dimensions(shape), "max_source_positions": 1500,
                                      "max_target_positions": 448, "bos_token_id": 50257, "eos_token_id": 50257,
                                      "pad_token_id": 50257, "decoder_start_token_id": 50258})
    with torch.device(device):
        model: Any = WhisperForConditionalGeneration(config)
    return model.to(dtype).eval()


def special_tokens(vocab_size: int) -> Any:
    """Whisper's control tokens by position (what a multilingual tokenizer would say)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from ml_backend.decoding import SpecialTokens

    n_languages = vocab_size - 51766  # 99 on base .. large-v2, 100 (Cantonese added) on large-v3
    after = FIRST_LANGUAGE_ID + n_languages
    return SpecialTokens(eot=50257, sot=50258, translate=after, transcribe=after + 1, no_speech=after + 4,
                         no_timestamps=after + 5, timestamp_begin=after + 6,
                         languages={code: FIRST_LANGUAGE_ID + i
                                    for i, code in enumerate(list(LANGUAGES)[:n_languages])})


def windows(count: int, seed: int = 0) -> tuple[list[float], list[int]]:
    rng = np.random.default_rng(seed)
    durations = rng.uniform(2.0, 30.0, count).round(2).tolist()
    return durations, [round(TOKENS_PER_SECOND * d) + 2 for d in durations]


def bench_shapes(args: argparse.Namespace) -> int:
    from ml_backend.whisper import avoid_cudnn_attention

    cuda = torch.cuda.is_available()
    if cuda:
        avoid_cudnn_attention()
    rows: list[ShapeRow] = []
    for shape in args.shape:
        rows += _bench_shape(shape, args, cuda, rows)
        if cuda:
            torch.cuda.empty_cache()
    for shape in args.shape:
        own = [r for r in rows if r.shape == shape]
        peers = [r for r in own if r.engine.startswith("transformers")]
        peer = max(peers, key=lambda r: r.speed) if peers else None
        print(f"\n{shape} (random weights), peer: {peer.engine if peer else '-'}")
        print(f"{'engine':52s} {'batch':>5s} {'tokens':>7s} {'× real time':>11s} {'vs peer':>7s} {'peak MB':>8s}")
        for row in own:
            print(_fmt(row, peer))
    return 0


def bench_attention(args: argparse.Namespace) -> int:
    """The cross-attention alone at each shape's decoding size: ``--slots`` rows (0: 256 on CUDA, 8 on a CPU), one
    query per head over 1 500 frames, bf16 on CUDA (float32 on a CPU). Each form of
    :func:`~ml_backend.decode_step.one_query_attention`, and on CUDA ``sdpa`` held to each of PyTorch's fused kernels
    (which one ``sdpa`` picks decides its speed). Prints milliseconds a call, the keys and values read per second if
    read once (the bound a one-query attention can reach), and the largest difference from float32 attention."""
    from torch.nn.attention import SDPBackend

    from ml_backend.decode_step import ATTENTION, SERVING_ATTENTION, one_query_attention
    from ml_backend.whisper import avoid_cudnn_attention

    cuda = torch.cuda.is_available()
    if cuda:
        avoid_cudnn_attention()  # as serving does: `sdpa` is then PyTorch's choice without cuDNN, `cudnn` asks for it
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    rows = args.slots or (256 if cuda else 8)
    table: list[dict[str, Any]] = []
    for shape in args.shape:
        dims = shape_dimensions(shape)
        heads, head_dim = dims["decoder_attention_heads"], dims["d_model"] // dims["decoder_attention_heads"]
        generator = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(rows, 1, heads, head_dim, device=device, generator=generator).transpose(1, 2) * head_dim**-0.5
        k, v = (torch.randn(rows, heads, 1500, head_dim, device=device, generator=generator) for _ in range(2))
        exact = one_query_attention(q[:16], k[:16], v[:16], kind="matmul")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        gigabytes = 2 * k.numel() * k.element_size() / 1e9
        forms: list[tuple[str, Callable[[], torch.Tensor]]] = [
            (kind + (" (serves)" if cuda and kind == SERVING_ATTENTION else ""),
             functools.partial(one_query_attention, q, k, v, kind=kind)) for kind in ATTENTION]
        if cuda:
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                forms.append((f"sdpa held to {name}", functools.partial(_sdpa_held_to, backend, q, k, v)))
        print(f"\n{shape}: cross-attention of {rows} rows x {heads} heads x 1500 frames x {head_dim}, {dtype}, "
              f"{gigabytes:.2f} GB of keys and values; device {torch.cuda.get_device_name() if cuda else 'cpu'}")
        print(f"{'form':28s} {'ms a call':>9s} {'GB/s':>7s} {'max diff':>8s}")
        for name, call in forms:
            try:
                with torch.inference_mode():
                    out = call()
                    for _ in range(3):
                        call()
                    seconds = _time_calls(call, args.repeats if args.repeats > 1 else 20, cuda)
            except RuntimeError as exc:  # a kernel that refuses this shape or device is a row saying so
                print(f"{name:28s} failed ({str(exc)[:200]})")
                continue
            diff = (out[:16].float() - exact).abs().max().item()
            table.append({"shape": shape, "form": name, "ms": 1000 * seconds, "gb_per_s": gigabytes / seconds,
                          "max_diff": diff})
            print(f"{name:28s} {1000 * seconds:9.3f} {gigabytes / seconds:7.0f} {diff:8.4f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(table, indent=2))
    return 0


def _sdpa_held_to(backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def _time_calls(call: Callable[[], torch.Tensor], repeats: int, cuda: bool) -> float:
    """Seconds a call, the mean of ``repeats`` back-to-back calls."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _bench_shape(shape: str, args: argparse.Namespace, cuda: bool, earlier: list[ShapeRow]) -> list[ShapeRow]:
    from ml_backend.decode_step import SERVING_ATTENTION
    from ml_backend.decoding import DecodeRequest, DecodeResult, WhisperDecoder

    model = random_whisper(shape, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32)
    special = special_tokens(model.config.vocab_size)
    durations, budgets = windows(args.windows)
    features = torch.randn(args.windows, model.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    audio = float(sum(durations))
    print(f"{shape}: {args.windows} windows, {audio:.0f} s of audio, {sum(budgets)} tokens; "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    _time_encoder(model, features)

    def ours(graphs: bool, attention: str = SERVING_ATTENTION) -> tuple[int, Callable[..., int]]:
        decoder = WhisperDecoder(model, special, [], [], slots=args.slots, cuda_graphs=graphs, attention=attention)

        def run(n: int = args.windows) -> int:
            got: list[int] = []

            def count(result: DecodeResult) -> list[DecodeRequest]:
                got.append(len(result.sequence.tokens))
                return []

            requests = [DecodeRequest(features=features[i], forced_length=budgets[i], tag=i)
                        for i in sorted(range(n), key=lambda i: -budgets[i])]
            decoder.steps = 0
            start = time.perf_counter()
            decoder.run(requests, count, languages=["en"])
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            print(f"  {decoder.slots} slots, {decoder.steps} steps, {1000 * wall / max(1, decoder.steps):.2f} ms "
                  f"per step (encoder included), {sum(got)} tokens", flush=True)
            return sum(got)
        return decoder.slots, run

    peer_batch = min(args.peer_batch, args.windows)
    variants: list[tuple[str, Callable[[], tuple[int, Callable[..., int]]]]] = [
        ("loopscribe", lambda: ours(True)),
        ("loopscribe, no graphs", lambda: ours(False)),
    ]
    for attention in getattr(args, "attention", None) or []:
        if attention != SERVING_ATTENTION:
            variants.append((f"loopscribe, {attention} attention", functools.partial(ours, True, attention)))
    if getattr(args, "peers", True):
        variants.append(("transformers generate",
                         lambda: (peer_batch, _peer(model, special, features, budgets, peer_batch, False))))
    if args.compile_peer:
        variants.append(("transformers generate, static cache + torch.compile",
                         lambda: (peer_batch, _peer(model, special, features, budgets, peer_batch, True))))
    rows: list[ShapeRow] = []
    for label, make in variants:
        try:
            batch, run = make()
            run(min(args.windows, max(batch, 8)))  # warm-up: graphs, kernels, compilation
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            tokens = run()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is a row saying so
            print(f"{label}: failed ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
            continue
        finally:  # the next variant sizes its batch to the free memory: free this one's buffers first
            run = None  # type: ignore[assignment]
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        rows.append(ShapeRow(label, shape, batch, args.windows, audio, tokens, wall, peak))
        print(_fmt(rows[-1], None), flush=True)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) | {"speed": r.speed} for r in earlier + rows], indent=2))
    return rows


def _time_encoder(model: Any, features: torch.Tensor, batch: int = 32) -> None:
    """Encoder milliseconds per window (a batch of ``batch``): the part of the work no decoder saves."""
    chunk = features[:batch].to(model.device, model.dtype)
    with torch.inference_mode():
        for _ in range(2):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.model.encoder(chunk)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
    print(f"  encoder: {1000 * (time.perf_counter() - start) / len(chunk):.2f} ms per window "
          f"(batch {len(chunk)})", flush=True)


def _peer(model: Any, special: Any, features: torch.Tensor, budgets: list[int], batch: int,
          compiled: bool) -> Callable[..., int]:
    """transformers' own ``generate`` over length-sorted batches, each as long as its longest window."""
    from transformers.generation import GenerationMixin

    prompt = [special.sot, special.languages["en"], special.transcribe]
    if compiled:
        model.generation_config.cache_implementation = "static"
        forward = model.forward
        model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    order = sorted(range(len(budgets)), key=lambda i: -budgets[i])

    def run(n: int = len(budgets)) -> int:
        tokens = 0
        chosen = order[:n]
        for start in range(0, len(chosen), batch):
            part = chosen[start:start + batch]
            longest = max(budgets[i] for i in part)
            ids = torch.tensor([prompt] * len(part), device=model.device)
            out = GenerationMixin.generate(
                model, input_features=features[part].to(model.device, model.dtype), decoder_input_ids=ids,
                attention_mask=torch.ones_like(ids), max_new_tokens=longest, min_new_tokens=longest,
                do_sample=False, eos_token_id=special.eot, pad_token_id=special.eot)
            tokens += sum(budgets[i] for i in part)
            del out
        return tokens
    if compiled:  # the first call sizes the static cache for the longest batch: later calls reuse it
        run(min(len(budgets), batch))
    return run


def _fmt(row: ShapeRow, peer: ShapeRow | None) -> str:
    ratio = f"{row.speed / peer.speed:6.2f}x" if peer else "      -"
    peak = f"{row.peak_memory_mb:8.0f}" if row.peak_memory_mb is not None else "       -"
    return f"{row.engine:52s} {row.batch_size:5d} {row.tokens:7d} {row.speed:11.1f} {ratio:>7s} {peak}"
