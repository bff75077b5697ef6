"""Word timings from Whisper's cross-attention, the way openai-whisper and transformers find them.

A few decoder cross-attention heads (the checkpoint's ``alignment_heads``) attend to the audio
frames a token is heard in. Running the decoder once more over the decoded text tokens, with
attention weights returned, gives a token × frame matrix; each head's weights are standardized
over tokens and smoothed over frames (median filter of 7), the heads averaged, and dynamic time
warping finds the monotonic path through it. Where the path moves to the next token is when that
token starts. Tokens are grouped into words (at spaces; each character for languages written
without them), and a word's probability is the product of its tokens' probabilities as decoded.

The engine uses the words to mark the stretches of a transcript it is least sure of: an
annotator listens there first (:func:`unsure_stretches`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy.ndimage import median_filter

from .transcription import Word

FRAME_SECONDS = 0.02  # one encoder frame (Whisper's 30 s window has 1500)
MEDIAN_WIDTH = 7
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
PUNCTUATION = set("\"'“¿([{-.,!?:;…)]}。，！？：、")


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path from the first to the last cell of ``cost`` (tokens × frames), moving right,
    down or diagonally: its (token, frame) indices. Row by row, each row in closed form (no Python loop over
    frames): ``acc[i, j] = C[j] + min_k<=j (b[k] - C[k-1])`` with ``C`` the row's cumulative cost and ``b`` the
    cheaper of the cells above."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        above = np.minimum(acc[i - 1, :-1], acc[i - 1, 1:])  # from (i-1, j-1) or (i-1, j), for j = 1..m
        cumulative = np.cumsum(cost[i - 1])
        shifted = np.concatenate([[0.0], cumulative[:-1]])
        acc[i, 1:] = cumulative + np.minimum.accumulate(above - shifted)
    i, j = n, m
    tokens, frames = [], []
    while i > 0 and j > 0:
        tokens.append(i - 1)
        frames.append(j - 1)
        k = int(np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])))
        i, j = (i - 1, j - 1) if k == 0 else (i - 1, j) if k == 1 else (i, j - 1)
    return np.array(tokens[::-1]), np.array(frames[::-1])


def token_boundaries(attention: np.ndarray) -> np.ndarray:
    """Start time (s) of each token, then the end of the last, from alignment-head weights (heads × tokens × frames)."""
    weights = (attention - attention.mean(axis=-2, keepdims=True)) / (attention.std(axis=-2, keepdims=True) + 1e-8)
    weights = median_filter(weights, size=(1, 1, MEDIAN_WIDTH), mode="nearest")
    matrix = weights.mean(axis=0)
    tokens, frames = dtw(-matrix)
    jumps = np.concatenate([[True], np.diff(tokens) > 0])
    starts = frames[jumps] * FRAME_SECONDS
    return np.concatenate([starts, [(frames[-1] + 1) * FRAME_SECONDS]])


def group_words(pieces: Sequence[tuple[str, list[int]]], language: str) -> list[tuple[str, list[int]]]:
    """Join decoded pieces (text, token positions) into words: at leading spaces, or one per piece for
    languages written without spaces; punctuation stays with the word before it."""
    words: list[tuple[str, list[int]]] = []
    for text, positions in pieces:
        starts_word = language in NO_SPACE_LANGUAGES or text.startswith(" ") or not words
        if words and text.strip() and all(c in PUNCTUATION for c in text.strip()):
            starts_word = False
        if starts_word:
            words.append((text, list(positions)))
        else:
            previous, where = words[-1]
            words[-1] = (previous + text, where + list(positions))
    return [(t.strip(), p) for t, p in words if t.strip()]


class WordAligner:
    """Aligns decoded windows to their audio with one extra decoder pass (eager attention, weights returned)."""

    def __init__(self, model: Any, tokenizer: Any, alignment_heads: Sequence[Sequence[int]] | None):
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        if alignment_heads:
            self.heads = [(int(layer), int(head)) for layer, head in alignment_heads]
        else:  # as openai-whisper does without a table: every head of the decoder's upper half
            layers, n_heads = config.decoder_layers, config.decoder_attention_heads
            self.heads = [(layer, head) for layer in range(layers // 2, layers) for head in range(n_heads)]

    def _pieces(self, tokens: list[int]) -> list[tuple[str, list[int]]]:
        """Decodable pieces: tokens joined until they form whole characters (a UTF-8 sequence may span tokens)."""
        pieces, pending = [], []
        for position in range(len(tokens)):
            pending.append(position)
            text = self.tokenizer.decode([tokens[p] for p in pending])
            if "\ufffd" not in text:
                pieces.append((text, pending))
                pending = []
        if pending:
            pieces.append((self.tokenizer.decode([tokens[p] for p in pending]), pending))
        return pieces

    @torch.inference_mode()
    def words(self, encoded: torch.Tensor, prompt: list[int], text_tokens: list[int], logprobs: list[float],
              duration: float, language: str, offset: float = 0.0) -> list[Word]:
        """Words of one window: ``encoded`` (1 × frames × d) is its encoder output, ``prompt`` the tokens before
        the text, ``logprobs`` one per text token as decoded. Times are ``offset`` + seconds into the window."""
        if not text_tokens:
            return []
        ids = torch.tensor([list(prompt) + list(text_tokens)], device=encoded.device)
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")  # sdpa does not return attention weights
        try:
            out = self.model.model.decoder(input_ids=ids, encoder_hidden_states=encoded, output_attentions=True,
                                           use_cache=False)
        finally:
            self.model.set_attn_implementation(previous)
        frames = max(1, min(encoded.shape[1], round(duration / FRAME_SECONDS)))
        attention = torch.stack([out.cross_attentions[layer][0, head, len(prompt):, :frames]
                                 for layer, head in self.heads]).float().cpu().numpy()
        bounds = token_boundaries(attention)
        words = []
        for text, positions in group_words(self._pieces(list(text_tokens)), language):
            start, end = bounds[positions[0]], bounds[positions[-1] + 1]
            probability = float(np.exp(sum(logprobs[p] for p in positions)))
            words.append(Word(round(offset + float(start), 3), round(offset + max(float(end), float(start)), 3),
                              text, round(probability, 4)))
        return words


def unsure_stretches(words: Sequence[Word], threshold: float) -> list[tuple[float, float, str]]:
    """Runs of consecutive words below ``threshold`` probability, as (start, end, text): where to listen."""
    runs: list[list[Word]] = [[]]
    for word in words:
        if word.probability < threshold:
            runs[-1].append(word)
        elif runs[-1]:
            runs.append([])
    return [(r[0].start, r[-1].end, " ".join(w.text for w in r)) for r in runs if r]
