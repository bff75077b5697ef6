"""The decoder Loopscribe served before the static-shape step (kept, frozen, as the tests' reference).

A plain loop over Hugging Face's decoder with a growing KV cache: one decoder step after
``<|startoftranscript|>`` gives the language posterior and the no-speech probability; then
greedy (or temperature-sampled) decoding with Whisper's suppression and timestamp rules
applied row by row. ``tests/test_decoder.py`` checks that :mod:`ml_backend.decoding` gives
the same tokens. The result types and the entropy are the product's own.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ml_backend.decode_step import token_entropy
from ml_backend.decoding import (
    MAX_INITIAL_TIMESTAMP,
    SAMPLE_LEN,
    DecodedSequence,
    LanguagePosterior,
    SpecialTokens,
)
from ml_backend.whisper import TIME_PRECISION


class WhisperDecoder:
    def __init__(self, model, special: SpecialTokens, suppress_tokens: list[int], begin_suppress: list[int]):
        self.model = model
        self.special = special
        vocab = model.config.vocab_size
        # Everything between <|endoftext|> and the timestamps is control: never generated.
        control = list(range(special.eot + 1, special.timestamp_begin))
        self.suppress = torch.tensor(sorted({t for t in suppress_tokens + control if 0 <= t < vocab}))
        self.begin_suppress = torch.tensor([t for t in begin_suppress if 0 <= t < vocab], dtype=torch.long)
        self.max_initial_timestamp_index = round(MAX_INITIAL_TIMESTAMP / TIME_PRECISION)
        self.lang_codes = list(special.languages)
        self.lang_ids = torch.tensor(list(special.languages.values()), dtype=torch.long)
        # transformers 5.x renamed the decoder's past_key_values to cache (the old name warns on every load)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.model.decoder.forward).parameters \
            else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.device, self.model.dtype)
        return self.model.model.encoder(features).last_hidden_state

    def _logits(self, tokens: torch.Tensor, encoded: torch.Tensor, cache=None):
        out = self.model.model.decoder(
            input_ids=tokens, encoder_hidden_states=encoded, use_cache=True, **{self._cache_arg: cache}
        )
        return self.model.proj_out(out.last_hidden_state[:, -1]).float(), out[self._cache_arg]

    @torch.inference_mode()
    def detect_language(self, encoded: torch.Tensor) -> list[LanguagePosterior]:
        """One decoder step after <|startoftranscript|>: language posterior and P(no speech)."""
        batch = encoded.shape[0]
        sot = torch.full((batch, 1), self.special.sot, dtype=torch.long, device=self.device)
        logits, _ = self._logits(sot, encoded)
        no_speech = logits.softmax(-1)[:, self.special.no_speech].tolist()
        if not self.special.multilingual:
            return [LanguagePosterior({"en": 1.0}, p) for p in no_speech]
        lang_probs = logits[:, self.lang_ids.to(self.device)].softmax(-1).tolist()
        return [
            LanguagePosterior(dict(zip(self.lang_codes, probs)), p) for probs, p in zip(lang_probs, no_speech)
        ]

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

    def _apply_rules(self, logits: torch.Tensor, sampled: list[list[int]], step: int, timestamps: bool) -> None:
        """Whisper's logit rules, in place: suppression, then timestamp pairing and ordering."""
        s = self.special
        logits[:, self.suppress.to(logits.device)] = -torch.inf
        if step == 0:
            logits[:, self.begin_suppress.to(logits.device)] = -torch.inf
        if not timestamps:
            logits[:, s.timestamp_begin :] = -torch.inf
            return
        tb = s.timestamp_begin
        for k, seq in enumerate(sampled):
            last_was_ts = len(seq) >= 1 and seq[-1] >= tb
            penultimate_was_ts = len(seq) < 2 or seq[-2] >= tb
            if last_was_ts:
                if penultimate_was_ts:
                    logits[k, tb:] = -torch.inf  # a pair just closed: text or the end next
                else:
                    logits[k, : s.eot] = -torch.inf  # a segment is open: its closing time next
            stamps = [t for t in seq if t >= tb]
            if stamps:  # time never goes backwards
                floor = stamps[-1] if last_was_ts and not penultimate_was_ts else stamps[-1] + 1
                logits[k, tb:floor] = -torch.inf
        if step == 0:  # the first token is a timestamp, and an early one
            logits[:, :tb] = -torch.inf
            logits[:, tb + self.max_initial_timestamp_index + 1 :] = -torch.inf
        logprobs = F.log_softmax(logits, dim=-1)
        timestamp_mass = logprobs[:, tb:].logsumexp(-1)
        best_text = logprobs[:, :tb].max(-1).values
        logits[timestamp_mass > best_text, :tb] = -torch.inf

    @torch.inference_mode()
    def decode(
        self,
        encoded: torch.Tensor,
        prompts: list[list[int]],
        *,
        timestamps: bool,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        max_tokens: int = SAMPLE_LEN,
    ) -> list[DecodedSequence]:
        """Decode a batch (all prompts the same length) greedily, or by sampling when temperature > 0."""
        batch = encoded.shape[0]
        prompt = torch.tensor(prompts, dtype=torch.long, device=self.device)
        max_tokens = min(max_tokens, self.model.config.max_target_positions - prompt.shape[1])
        sampled: list[list[int]] = [[] for _ in range(batch)]
        entropies: list[list[float]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)

        logits, cache = self._logits(prompt, encoded)
        for step in range(max_tokens):
            self._apply_rules(logits, sampled, step, timestamps)
            log_p = F.log_softmax(logits, dim=-1)
            entropy = token_entropy(log_p)
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_tokens = logits.argmax(-1)
            next_tokens = torch.where(done, torch.full_like(next_tokens, self.special.eot), next_tokens)
            chosen_logp = log_p.gather(-1, next_tokens[:, None]).squeeze(-1)
            for k, (tok, h, lp) in enumerate(zip(next_tokens.tolist(), entropy.tolist(), chosen_logp.tolist())):
                if done[k]:
                    continue
                entropies[k].append(h)
                logprobs[k].append(lp)
                if tok != self.special.eot:
                    sampled[k].append(tok)
            done |= next_tokens == self.special.eot
            if bool(done.all()):
                break
            logits, cache = self._logits(next_tokens[:, None], encoded, cache)
        return [
            DecodedSequence(sampled[k], entropies[k], logprobs[k], bool(done[k])) for k in range(batch)
        ]
