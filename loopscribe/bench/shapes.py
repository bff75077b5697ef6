"""``loopscribe bench engine --shape large-v3``: decoder throughput at a model's shapes, without its weights.

Random weights decode nonsense and stop at random places, so each window decodes exactly
the number of tokens real speech of its duration yields (``TOKENS_PER_SECOND``, plus a
timestamp pair), with every rule and uncertainty signal computed as when serving.
Windows are 2–30 s (uniform, seeded); audio seconds are the windows' durations. Rows:

- ``loopscribe``: this decoder, continuous batching, CUDA graphs (the serving path);
- ``loopscribe, no graphs``: the same, each step launched kernel by kernel;
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


def _bench_shape(shape: str, args: argparse.Namespace, cuda: bool, earlier: list[ShapeRow]) -> list[ShapeRow]:
    from ml_backend.decoding import DecodeRequest, DecodeResult, WhisperDecoder

    model = random_whisper(shape, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32)
    special = special_tokens(model.config.vocab_size)
    durations, budgets = windows(args.windows)
    features = torch.randn(args.windows, model.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    audio = float(sum(durations))
    print(f"{shape}: {args.windows} windows, {audio:.0f} s of audio, {sum(budgets)} tokens; "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    _time_encoder(model, features)

    def ours(graphs: bool, attention: str = "sdpa") -> tuple[int, Callable[..., int]]:
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
        if attention != "sdpa":
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
