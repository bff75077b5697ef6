"""A compact Whisper decoder over a Hugging Face model that exposes what uncertainty needs, with
continuous batching.

``WhisperForConditionalGeneration.generate`` hides the per-step distributions behind
several layers of processors and long-form logic. Here the steps are explicit, as in
openai-whisper and faster-whisper: encode once; the decoder step after
``<|startoftranscript|>`` gives the language posterior and the no-speech probability;
then greedy (or temperature-sampled) decoding with Whisper's suppression and timestamp
rules, and per-token entropy and log-probability of the distribution the token was
actually chosen from. The step itself (:mod:`ml_backend.decode_step`) has static shapes;
this module keeps its slots full: windows from any number of clips queue up, a slot
whose window finished is refilled with the next one, and each finished window is handed
to the caller, who may queue more (a temperature fallback, an undecoded tail).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .decode_step import SERVING_ATTENTION, DecodeStep, StepRules
from .whisper import TIME_PRECISION

SAMPLE_LEN = 224  # Whisper samples at most n_text_ctx // 2 tokens per 30 s window
MAX_INITIAL_TIMESTAMP = 1.0  # seconds
GPU_CHECK_EVERY = 8  # CUDA: steps between looks at which rows finished (each look is a host sync)
CPU_SLOTS = 8
GPU_MAX_SLOTS = 256
GPU_MEMORY_SHARE = 0.6  # of the free GPU memory, for the slots' caches


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens, read from the tokenizer (they shift by one on *.en models)."""

    eot: int
    sot: int
    translate: int
    transcribe: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    languages: dict[str, int]  # code → token id; empty on English-only models

    @property
    def multilingual(self) -> bool:
        return bool(self.languages)

    @classmethod
    def from_tokenizer(cls, tokenizer, language_codes: list[str], multilingual: bool) -> SpecialTokens:
        """``multilingual`` comes from the model: *.en tokenizers list language tokens the model never learned."""
        ids = tokenizer.convert_tokens_to_ids
        no_timestamps = ids("<|notimestamps|>")
        vocab = tokenizer.get_vocab()
        languages = {code: vocab[f"<|{code}|>"] for code in language_codes if f"<|{code}|>" in vocab}
        if not multilingual:
            languages = {}
        return cls(
            eot=ids("<|endoftext|>"),
            sot=ids("<|startoftranscript|>"),
            translate=ids("<|translate|>"),
            transcribe=ids("<|transcribe|>"),
            no_speech=no_timestamps - 1,  # <|nospeech|> / <|nocaptions|> sits right before it
            no_timestamps=no_timestamps,
            timestamp_begin=no_timestamps + 1,
            languages=languages,
        )


@dataclass
class LanguagePosterior:
    probabilities: dict[str, float]  # all languages the model knows, summing to 1
    no_speech_prob: float

    def best(self, among: Collection[str] | None = None) -> tuple[str, float]:
        """The likeliest language, and its probability. With ``among`` (a project's languages) the choice is
        restricted to those and the probability renormalized over them."""
        allowed = {c: p for c, p in self.probabilities.items() if among is None or c in among} or self.probabilities
        code = max(allowed, key=allowed.__getitem__)
        total = sum(allowed.values())
        return code, allowed[code] / total if total > 0 else 1.0


@dataclass
class DecodedSequence:
    """Sampled tokens (prompt and final <|endoftext|> excluded) with per-step signals.

    ``entropies`` and ``logprobs`` have one more entry than ``tokens``: the last is the
    step that chose <|endoftext|> (or hit the length limit).
    """

    tokens: list[int]
    entropies: list[float]
    logprobs: list[float]
    finished: bool


@dataclass
class DecodeRequest:
    """One ≤30 s window to decode: 16 kHz samples (or ready log-mel ``features``) and a temperature."""

    samples: np.ndarray | None = None
    features: torch.Tensor | None = None  # mels × frames; computed from ``samples`` when None
    temperature: float = 0.0
    tag: Any = None  # the caller's, handed back with the result
    seed: int = 0  # starts this window's sampling draws (temperature > 0), whatever else shares the batch
    forced_length: int = -1  # benchmarks with random weights: exactly this many tokens


@dataclass
class DecodeResult:
    request: DecodeRequest
    sequence: DecodedSequence
    posterior: LanguagePosterior
    language: str | None  # the language token the prompt used (None on English-only models)
    encoded: torch.Tensor | None = field(default=None, repr=False)  # 1 × frames × d, with ``words`` only


class WhisperDecoder:
    """Decodes windows through a fixed number of slots (:class:`DecodeStep`), refilled as rows finish."""

    def __init__(self, model, special: SpecialTokens, suppress_tokens: list[int], begin_suppress: list[int],
                 *, feature_extractor: Any = None, slots: int = 0, cuda_graphs: bool = True,
                 attention: str = SERVING_ATTENTION):
        """``slots`` is the decoding batch; 0 is :data:`CPU_SLOTS` on CPU and as many as fit in the free memory
        on CUDA (:func:`gpu_slots`)."""
        self.model, self.special, self.feature_extractor = model, special, feature_extractor
        vocab = model.config.vocab_size
        # Everything between <|endoftext|> and the timestamps is control: never generated.
        control = list(range(special.eot + 1, special.timestamp_begin))
        self.rules = StepRules(
            eot=special.eot,
            no_speech=special.no_speech,
            timestamp_begin=special.timestamp_begin,
            max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP / TIME_PRECISION),
            suppress=tuple(sorted({t for t in suppress_tokens + control if 0 <= t < vocab})),
            begin_suppress=tuple(t for t in begin_suppress if 0 <= t < vocab),
            language_ids=tuple(special.languages.values()),
            max_tokens=min(SAMPLE_LEN, model.config.max_target_positions - 4),
        )
        self.lang_codes = list(special.languages)
        self._code_of = {token: code for code, token in special.languages.items()}
        if slots <= 0:
            slots = gpu_slots(model) if self.device.type == "cuda" else CPU_SLOTS
        self.slots = slots
        self.cuda_graphs, self.attention = cuda_graphs, attention
        self.check_every = GPU_CHECK_EVERY if self.device.type == "cuda" else 1
        self._step: DecodeStep | None = None
        self.steps = 0  # decoder steps run (benchmarks divide by it)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset(self) -> None:
        """Forget captured graphs and buffers (call when the model's modules or weights change)."""
        self._step = None

    @torch.inference_mode()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.device, self.model.dtype)
        return self.model.model.encoder(features).last_hidden_state

    def prompt(self, language: str | None, task: str, timestamps: bool) -> list[int]:
        s = self.special
        tokens = [s.sot]
        if s.multilingual:
            if language not in s.languages:
                raise ValueError(f"language {language!r} is not one this model knows")
            tokens += [s.languages[language], s.translate if task == "translate" else s.transcribe]
        if not timestamps:
            tokens.append(s.no_timestamps)
        return tokens

    def features(self, requests: list[DecodeRequest]) -> torch.Tensor:
        missing = [r for r in requests if r.features is None]
        if missing:
            feats = self.feature_extractor([r.samples for r in missing], sampling_rate=SAMPLE_RATE,
                                           return_tensors="pt").input_features
            for r, f in zip(missing, feats):
                r.features = f
        return torch.stack([r.features for r in requests])  # type: ignore[misc]

    def run(
        self,
        requests: Iterable[DecodeRequest],
        on_result: Callable[[DecodeResult], Iterable[DecodeRequest]],
        *,
        task: str = "transcribe",
        timestamps: bool = True,
        languages: Collection[str] | None = None,
        words: bool = False,
        adapter_key: Any = None,
    ) -> None:
        """Decode every request; ``on_result`` gets each finished window and returns requests to queue next.

        ``languages`` restricts language detection (one language: that language, no detection).
        With ``words`` each result carries its window's encoder output (for word alignment).
        ``adapter_key`` names the LoRA adapter active on the model (graphs are captured per adapter).
        """
        queue = deque(requests)
        step = self._buffers(words)
        step.timestamps = timestamps
        allowed = [code for code in self.lang_codes if languages is None or code in languages] or self.lang_codes
        bias = torch.full_like(step.language_bias, -torch.inf)
        bias[[self.lang_codes.index(c) for c in allowed] or [0]] = 0.0
        step.language_bias.copy_(bias)
        placeholder = allowed[0] if self.special.multilingual else None
        prompt = self.prompt(placeholder, task, timestamps)
        live: dict[int, DecodeRequest] = {}
        age = [0] * self.slots  # steps since a slot was loaded: a bound on its position
        step.release(list(range(self.slots)))
        while queue or live:
            free = [slot for slot in range(self.slots) if slot not in live]
            if queue and free and (not live or len(free) >= max(1, self.slots // 4) or len(free) >= len(queue)):
                rows = free[: len(queue)]
                batch = [queue.popleft() for _ in rows]
                step.load(rows, self.encode(self.features(batch)), [prompt] * len(rows),
                          [r.temperature for r in batch], [r.forced_length for r in batch], [r.seed for r in batch])
                for slot, request in zip(rows, batch):
                    live[slot], age[slot] = request, 0
            for _ in range(self.check_every):
                sampling = [s for s, r in live.items() if r.temperature > 0]
                if sampling:
                    step.draw_noise(sampling)
                step.step(max(age[s] for s in live) + 1, adapter_key)
                self.steps += 1
                for s in live:
                    age[s] += 1
            finished = [s for s in torch.nonzero(step.done).flatten().tolist() if s in live]
            if not finished:
                continue
            for result in self._harvest(step, finished, [live[s] for s in finished]):
                queue.extendleft(reversed(list(on_result(result))))
            for s in finished:
                del live[s]
            step.release(finished)

    def _buffers(self, words: bool) -> DecodeStep:
        if self._step is None or (words and self._step.encoded is None):
            self._step = None  # free the old buffers first
            self._step = DecodeStep(self.model, self.rules, self.slots, words=words, graphs=self.cuda_graphs,
                                    attention=self.attention)
        return self._step

    def _harvest(self, step: DecodeStep, rows: list[int], requests: list[DecodeRequest]) -> list[DecodeResult]:
        index = torch.tensor(rows, device=self.device)
        n = step.n.index_select(0, index).tolist()
        tokens = step.out_tokens.index_select(0, index).tolist()
        entropies = step.out_entropy.index_select(0, index).tolist()
        logprobs = step.out_logprob.index_select(0, index).tolist()
        no_speech = step.no_speech.index_select(0, index).tolist()
        language_tokens = step.prompt[:, 1].index_select(0, index).tolist()
        language_probs = step.language_logits.index_select(0, index).softmax(-1).tolist()
        results = []
        for k, (row, request) in enumerate(zip(rows, requests)):
            count = n[k]
            chosen = tokens[k][:count]
            finished = bool(chosen) and chosen[-1] == self.special.eot
            sequence = DecodedSequence(chosen[:-1] if finished else chosen, entropies[k][:count],
                                       logprobs[k][:count], finished)
            if self.special.multilingual:
                posterior = LanguagePosterior(dict(zip(self.lang_codes, language_probs[k])), no_speech[k])
                language: str | None = self._code_of.get(language_tokens[k])
            else:
                posterior, language = LanguagePosterior({"en": 1.0}, no_speech[k]), None
            encoded = step.encoded[row : row + 1] if step.encoded is not None else None
            results.append(DecodeResult(request, sequence, posterior, language, encoded))
        return results


def gpu_slots(model: Any, share: float = GPU_MEMORY_SHARE) -> int:
    """How many rows fit in ``share`` of the free GPU memory: each holds its audio's cross-attention keys
    and values, its self-attention cache, its encoder output and a few vocabulary-sized temporaries."""
    config = model.config
    itemsize = torch.finfo(model.dtype).bits // 8
    layers, d, frames = config.decoder_layers, config.d_model, config.max_source_positions
    per_row = itemsize * (2 * layers * d * (frames + SAMPLE_LEN + 4) + frames * d) + 16 * 4 * config.vocab_size
    per_row += itemsize * frames * config.encoder_ffn_dim  # the encoder's widest activation at load
    free, _ = torch.cuda.mem_get_info(model.device)
    return int(max(1, min(GPU_MAX_SLOTS, share * free // per_row)))
