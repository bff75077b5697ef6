"""One Whisper decoder step over a fixed set of batch slots, with static shapes.

Every tensor the step reads or writes is allocated once: the self-attention KV cache
(``slots × positions``), the cross-attention keys and values of each slot's audio, and
the per-slot decoding state (position, last tokens, last timestamp, finished flag,
temperature). Whisper's logit rules are vectorised over the batch, the chosen token,
its entropy and log-probability are written into per-slot output rows, and nothing is
copied to the host. So the step has the same shapes every time and, on CUDA, is
captured once in a CUDA graph and replayed: one launch per step instead of hundreds of
kernel launches and a host sync.

The prompt is fed through the same step, one token per position: the step at position
0 yields the language posterior and P(no speech) and writes the chosen language into the
slot's prompt, the last prompt position yields the first sampled token. Rows refill
independently (continuous batching, :class:`ml_backend.decoding.WhisperDecoder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MAX_PROMPT = 4  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>
POSITION_BUCKET = 32  # graphs are captured per attention length rounded up to this
# On an H200 (large-v3, 256 slots, bf16) the cross-attention alone took 0.87 ms a call with flash (tiles padded from
# one query to 128), 0.99 with the memory-efficient kernel, 0.94 with `matmul`, 4.5 with eager `reduce` (0.63
# compiled), 0.52 with flex_attention compiled and 0.43 with cuDNN's fused attention (4.6 TB/s of keys and values,
# about the card's bandwidth): so `cudnn` serves (README, "The decoder on a GPU"); off CUDA it is `sdpa`
ATTENTION = ("sdpa", "cudnn", "matmul", "reduce")
SERVING_ATTENTION = "cudnn"
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class StepRules:
    """Token ids and Whisper's decoding rules, fixed for a model."""

    eot: int
    no_speech: int
    timestamp_begin: int
    max_initial_timestamp_index: int
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    language_ids: tuple[int, ...]  # empty on English-only models
    max_tokens: int  # sampled tokens per window (Whisper: n_text_ctx // 2)


def half_scores_in_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs here for ``dtype`` inputs (CUDA, PyTorch ≥ 2.8)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        probe = torch.ones(1, 1, 1, dtype=dtype, device=device)
        return torch.bmm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                        kind: str = "sdpa", fp32_scores: bool = False) -> torch.Tensor:
    """Attention of one (already scaled) query per row over ``k``/``v``, masked where ``mask`` is False.

    ``kind``: ``sdpa`` (PyTorch's fused kernels, its choice), ``cudnn`` (unmasked CUDA half precision: cuDNN's
    fused attention first, which :func:`ml_backend.whisper.avoid_cudnn_attention` turns off for everything else;
    otherwise ``sdpa``), ``matmul`` (scores by matrix product, softmax in float32, weighted sum) or ``reduce``
    (the same sums as elementwise products reduced in float32: one query per row leaves a matrix kernel's tiles
    nearly empty). ``fp32_scores`` (matmul, CUDA half precision; see :func:`half_scores_in_fp32`): the scores
    leave the matrix product in float32 instead of being rounded to the inputs' precision first."""
    if kind == "cudnn" and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):  # the others where cuDNN refuses a shape
            return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    if kind in ("sdpa", "cudnn"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    at_least_fp32 = torch.promote_types(q.dtype, torch.float32)
    if kind == "reduce":
        scores = (q * k).sum(-1, dtype=at_least_fp32).unsqueeze(-2)
    elif fp32_scores:
        flat = torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), out_dtype=torch.float32)
        scores = flat.view(*q.shape[:-1], k.shape[-2])
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).to(at_least_fp32)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    weights = scores.softmax(-1).to(v.dtype)  # rows × heads × 1 × keys
    if kind == "reduce":
        return (weights.transpose(-1, -2) * v).sum(-2, keepdim=True, dtype=at_least_fp32).to(v.dtype)
    return torch.matmul(weights, v)


def token_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's next-token distribution.

    Suppressed tokens have log-probability -inf; ``p * log p`` is NaN there, ``entr`` is 0, so
    the entropy is that of the tokens Whisper may actually emit.
    """
    return torch.special.entr(log_p.exp()).sum(-1)


class DecodeStep:
    """Static buffers and the decoder step for ``slots`` rows of one model (device and dtype of the model)."""

    def __init__(self, model: Any, rules: StepRules, slots: int, *, words: bool = False, graphs: bool = True,
                 attention: str = SERVING_ATTENTION):
        """``graphs``: on CUDA, replay each step from a captured CUDA graph (off: launch its kernels each time).
        ``attention``: one of :data:`ATTENTION` (see :func:`one_query_attention`)."""
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
        self.model, self.rules, self.slots, self.graphs, self.attention = model, rules, slots, graphs, attention
        config = model.config
        self.device, self.dtype = model.device, model.dtype
        decoder = model.model.decoder
        self.layers = list(decoder.layers)
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.positions = MAX_PROMPT + rules.max_tokens
        frames = config.max_source_positions
        n_layers, b, d, dev = len(self.layers), slots, config.d_model, self.device

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        kv = (n_layers, b, self.heads, self.positions, self.head_dim)
        self.self_k, self.self_v = zeros(*kv, dtype=self.dtype), zeros(*kv, dtype=self.dtype)
        cross = (n_layers, b, self.heads, frames, self.head_dim)
        self.cross_k, self.cross_v = zeros(*cross, dtype=self.dtype), zeros(*cross, dtype=self.dtype)
        self.encoded = zeros(b, frames, d, dtype=self.dtype) if words else None  # kept for word alignment

        # per-slot state, updated in place by the step
        self.token = zeros(b)  # the token at `pos`, fed to the next step
        self.pos = zeros(b)
        self.prompt = zeros(b, MAX_PROMPT)
        self.prompt_len = zeros(b)
        self.n = zeros(b)  # sampled steps so far (tokens plus a final <|endoftext|>)
        self.last, self.penult, self.last_stamp = zeros(b) - 1, zeros(b) - 1, zeros(b) - 1
        self.done = torch.ones(b, dtype=torch.bool, device=dev)
        self.temperature = zeros(b, dtype=torch.float32)
        self.language_bias = zeros(max(1, len(rules.language_ids)), dtype=torch.float32)  # 0 allowed, -inf not
        self.forced_length = zeros(b) - 1  # benchmarks: exactly this many tokens, then <|endoftext|>
        vocab = config.vocab_size
        self.noise = torch.ones(b, vocab, dtype=torch.float32, device=dev)  # Exp(1) draws for sampling rows
        # one generator per slot, seeded per window at load: a window's draws depend on its seed alone
        self.generators = [torch.Generator(device=dev) for _ in range(b)]
        # outputs: one column per sampled step, plus a scratch column for rows that record nothing
        self.out_tokens = zeros(b, rules.max_tokens + 1)
        self.out_entropy = zeros(b, rules.max_tokens + 1, dtype=torch.float32)
        self.out_logprob = zeros(b, rules.max_tokens + 1, dtype=torch.float32)
        self.language_logits = zeros(b, max(1, len(rules.language_ids)), dtype=torch.float32)
        self.no_speech = zeros(b, dtype=torch.float32)

        # constants
        self._rows = torch.arange(b, device=dev)
        self._key_index = torch.arange(self.positions, device=dev)
        self._vocab = torch.arange(vocab, device=dev)
        fixed = torch.zeros(vocab, dtype=torch.bool, device=dev)
        fixed[list(rules.suppress)] = True
        self._suppress = fixed
        begin = torch.zeros(vocab, dtype=torch.bool, device=dev)
        begin[list(rules.begin_suppress)] = True
        self._begin_suppress = begin
        self._language_ids = torch.tensor(rules.language_ids or (0,), device=dev)
        self._scaling = self.head_dim ** -0.5
        self._scores_in_fp32 = attention == "matmul" and half_scores_in_fp32(self.device, self.dtype)
        self._state = [self.token, self.pos, self.prompt, self.prompt_len, self.n, self.last, self.penult,
                       self.last_stamp, self.done]
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None  # one memory pool for all graphs: they never run at the same time
        self.timestamps = True  # Whisper's timestamp rules on; set per run (part of a graph's key)

    # ---- loading rows --------------------------------------------------------------------------------

    @torch.inference_mode()
    def load(self, rows: list[int], encoded: torch.Tensor, prompts: list[list[int]], temperatures: list[float],
             forced_lengths: list[int] | None = None, seeds: list[int] | None = None) -> None:
        """Start decoding ``encoded`` (len(rows) × frames × d encoder outputs) in the given slots; ``seeds``
        start each slot's sampling generator (rows at temperature 0 never draw)."""
        index = torch.tensor(rows, device=self.device)
        encoded = encoded.to(self.dtype)
        shape = (len(rows), -1, self.heads, self.head_dim)
        for layer_index, layer in enumerate(self.layers):
            attention = layer.encoder_attn
            self.cross_k[layer_index].index_copy_(0, index, attention.k_proj(encoded).view(shape).transpose(1, 2))
            self.cross_v[layer_index].index_copy_(0, index, attention.v_proj(encoded).view(shape).transpose(1, 2))
        if self.encoded is not None:
            self.encoded.index_copy_(0, index, encoded)
        padded = [p + [p[-1]] * (MAX_PROMPT - len(p)) for p in prompts]

        def put(tensor: torch.Tensor, values: Any) -> None:
            tensor.index_copy_(0, index, torch.as_tensor(values, dtype=tensor.dtype, device=self.device))

        put(self.prompt, padded)
        put(self.prompt_len, [len(p) for p in prompts])
        put(self.token, [p[0] for p in prompts])
        put(self.temperature, temperatures)
        put(self.forced_length, forced_lengths or [-1] * len(rows))
        for tensor, value in ((self.pos, 0), (self.n, 0), (self.last, -1), (self.penult, -1),
                              (self.last_stamp, -1)):
            put(tensor, [value] * len(rows))
        put(self.done, [False] * len(rows))
        for row, seed in zip(rows, seeds or [0] * len(rows)):
            self.generators[row].manual_seed(seed)

    def draw_noise(self, rows: list[int]) -> None:
        """Fresh Exp(1) draws for the next step of ``rows``, the slots that sample (temperature > 0), each
        from its own generator: what a window samples does not depend on its neighbours in the batch."""
        for row in rows:
            self.noise[row].exponential_(generator=self.generators[row])

    def release(self, rows: list[int]) -> None:
        """Mark slots empty (they keep stepping, masked, until refilled)."""
        self.done[torch.tensor(rows, device=self.device)] = True

    # ---- the step ------------------------------------------------------------------------------------

    def step(self, length: int, adapter_key: Any = None) -> None:
        """Advance every slot by one position, attending over the first ``length`` positions.

        ``length`` must exceed every live slot's position. On CUDA the step is replayed from a graph
        captured per (length bucket, timestamp rules on or off, ``adapter_key``): the adapter key names
        whatever changes the model's modules (the active LoRA adapter), since a graph replays the modules
        it saw. Weights that change otherwise need a new :class:`DecodeStep`.
        """
        length = min(self.positions, -(-length // POSITION_BUCKET) * POSITION_BUCKET)
        if self.device.type != "cuda" or not self.graphs:
            with torch.inference_mode():
                self._step(length)
            return
        key = (length, self.timestamps, adapter_key)
        if key not in self._graphs:
            self._graphs[key] = self._capture(length)
        self._graphs[key].replay()

    def _capture(self, length: int) -> torch.cuda.CUDAGraph:
        saved = [t.clone() for t in self._state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, kernel selection)
                self._step(length)
                for tensor, value in zip(self._state, saved):
                    tensor.copy_(value)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            self._step(length)
        for tensor, value in zip(self._state, saved):  # capturing ran nothing, but be exact
            tensor.copy_(value)
        return graph

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        return one_query_attention(q, k, v, mask, kind=self.attention, fp32_scores=self._scores_in_fp32)

    def _attend(self, layer_index: int, layer: Any, x: torch.Tensor, length: int) -> torch.Tensor:
        b, h, dh = self.slots, self.heads, self.head_dim
        attention = layer.self_attn
        hidden = layer.self_attn_layer_norm(x)
        q = (attention.q_proj(hidden) * self._scaling).view(b, 1, h, dh).transpose(1, 2)
        k = attention.k_proj(hidden).view(b, h, dh)
        v = attention.v_proj(hidden).view(b, h, dh)
        self.self_k[layer_index][self._rows, :, self.pos] = k
        self.self_v[layer_index][self._rows, :, self.pos] = v
        mask = (self._key_index[:length][None, :] <= self.pos[:, None])[:, None, None, :]
        out = self._attention(q, self.self_k[layer_index][:, :, :length], self.self_v[layer_index][:, :, :length],
                              mask)
        x = x + attention.out_proj(out.transpose(1, 2).reshape(b, 1, -1))

        cross = layer.encoder_attn
        hidden = layer.encoder_attn_layer_norm(x)
        q = (cross.q_proj(hidden) * self._scaling).view(b, 1, h, dh).transpose(1, 2)
        out = self._attention(q, self.cross_k[layer_index], self.cross_v[layer_index])
        x = x + cross.out_proj(out.transpose(1, 2).reshape(b, 1, -1))

        hidden = layer.final_layer_norm(x)
        return x + layer.fc2(layer.activation_fn(layer.fc1(hidden)))

    def _logits(self, length: int) -> torch.Tensor:
        decoder = self.model.model.decoder
        scale = getattr(decoder, "embed_scale", 1.0)
        x = decoder.embed_tokens(self.token) * scale + decoder.embed_positions.weight[self.pos]
        x = x[:, None, :]
        for layer_index, layer in enumerate(self.layers):
            x = self._attend(layer_index, layer, x, length)
        return self.model.proj_out(decoder.layer_norm(x)[:, 0]).float()

    def _apply_rules(self, logits: torch.Tensor) -> torch.Tensor:
        """Whisper's rules for every row at once: suppression, then timestamp pairing and ordering."""
        r, vocab = self.rules, self._vocab[None, :]
        tb = r.timestamp_begin
        first = (self.n == 0)[:, None]
        masked = self._suppress[None, :] | (first & self._begin_suppress[None, :])
        if not self.timestamps:
            masked = masked | (vocab >= tb)
        else:
            has_last = self.n >= 1
            last_was_ts = has_last & (self.last >= tb)
            penult_was_ts = (self.n < 2) | (self.penult >= tb)
            closing = last_was_ts & ~penult_was_ts  # a segment is open: its closing time next
            masked = masked | ((last_was_ts & penult_was_ts)[:, None] & (vocab >= tb))
            masked = masked | (closing[:, None] & (vocab < r.eot))
            floor = torch.where(closing, self.last_stamp, self.last_stamp + 1)  # time never goes backwards
            masked = masked | ((self.last_stamp >= 0)[:, None] & (vocab >= tb) & (vocab < floor[:, None]))
            masked = masked | (first & ((vocab < tb) | (vocab > tb + r.max_initial_timestamp_index)))
        # benchmarks with random weights: a fixed number of tokens per window, like real speech
        budget = self.forced_length >= 0
        masked = masked | ((budget & (self.n < self.forced_length))[:, None] & (vocab == r.eot))
        masked = masked | ((budget & (self.n >= self.forced_length))[:, None] & (vocab != r.eot))
        logits = logits.masked_fill(masked, -torch.inf)
        if self.timestamps:
            logprobs = F.log_softmax(logits, dim=-1)
            timestamp_mass = logprobs[:, tb:].logsumexp(-1)
            best_text = logprobs[:, :tb].max(-1).values
            logits = logits.masked_fill((timestamp_mass > best_text)[:, None] & (vocab < tb), -torch.inf)
        return logits

    def _step(self, length: int) -> None:
        r = self.rules
        logits = self._logits(length)

        # position 0: the language posterior and P(no speech), and the language written into the prompt
        first = self.pos == 0
        self.no_speech.copy_(torch.where(first, logits.softmax(-1)[:, r.no_speech], self.no_speech))
        if r.language_ids:
            language_logits = logits[:, self._language_ids]
            self.language_logits.copy_(torch.where(first[:, None], language_logits, self.language_logits))
            chosen_language = self._language_ids[(language_logits + self.language_bias).argmax(-1)]
            self.prompt[:, 1].copy_(torch.where(first, chosen_language, self.prompt[:, 1]))

        # the last prompt position and every later one sample a token
        sampling = (self.pos >= self.prompt_len - 1) & ~self.done
        logits = self._apply_rules(logits)
        log_p = F.log_softmax(logits, dim=-1)
        entropy = token_entropy(log_p)
        greedy = logits.argmax(-1)
        warm = self.temperature > 0  # exponential race: argmax p_i / E_i is a draw from p
        tempered = F.softmax(logits / torch.where(warm, self.temperature, 1.0)[:, None], dim=-1)
        token = torch.where(warm, (tempered / self.noise).argmax(-1), greedy)
        logprob = log_p.gather(-1, token[:, None])[:, 0]

        column = torch.where(sampling, self.n, r.max_tokens)[:, None]
        self.out_tokens.scatter_(1, column, token[:, None])
        self.out_entropy.scatter_(1, column, entropy[:, None])
        self.out_logprob.scatter_(1, column, logprob[:, None])

        is_eot = token == r.eot
        extends = sampling & ~is_eot
        self.penult.copy_(torch.where(extends, self.last, self.penult))
        self.last.copy_(torch.where(extends, token, self.last))
        self.last_stamp.copy_(torch.where(extends & (token >= r.timestamp_begin), token, self.last_stamp))
        n = self.n + sampling.long()
        self.n.copy_(n)
        self.done.copy_(self.done | (sampling & (is_eot | (n >= r.max_tokens))))
        following = self.prompt.gather(1, (self.pos + 1).clamp(max=MAX_PROMPT - 1)[:, None])[:, 0]
        self.token.copy_(torch.where(self.pos + 1 < self.prompt_len, following, token))
        self.pos.copy_(torch.where(self.done, self.pos, (self.pos + 1).clamp(max=self.positions - 1)))
