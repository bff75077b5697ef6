"""The Whisper transcription engine: audio in, typed transcripts with uncertainty out.

One :class:`WhisperEngine` loads the model once. ``transcribe`` takes a batch of 16 kHz
mono clips of any length, cuts each at pauses into ≤30 s windows, decodes the windows
in duration-sorted batches (language detected per window, so a file that switches
language mid-way reports both), falls back to sampling at rising temperature when a
window loops, and reassembles one :class:`Transcription` per clip. Identical audio is
decoded once per model version and options (content-hash cache).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from . import audio as audio_lib
from .alignment import WordAligner
from .decoding import DecodedSequence, DecodeRequest, DecodeResult, WhisperDecoder
from .errors import ConfigurationError
from .live import live_model, served_version
from .model_store import ResolvedModel, resolve_base
from .settings import Settings
from .transcription import Segment, TranscribeOptions, Transcription, Word
from .uncertainty import (
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    Uncertainty,
    compression_ratio,
    confidence,
    max_run,
)
from .whisper import (
    TIME_PRECISION,
    avoid_cudnn_attention,
    load_whisper,
    pick_device,
    pick_dtype,
    quantizes,
    quiet_peft,
)

log = logging.getLogger(__name__)

MAX_ADAPTERS = 64  # LoRA adapters kept beside one base model (a few MiB each); least recently used dropped
MIN_TAIL_SECONDS = 1.0  # an undecoded window end shorter than this is left alone
MAX_TAIL_ROUNDS = 2


def sampling_seed(samples: np.ndarray, attempt: int) -> int:
    """The seed of a window's sampled attempt, from its audio: the same window samples the same
    transcript in any batch, request or process on the same kind of device (served, re-scored or
    evaluated alike)."""
    return int(audio_lib.content_hash(samples)[:15], 16) + attempt


def _adapter_name(version: str) -> str:
    """peft names adapters in module paths: no dots or slashes, whatever the version string holds."""
    return "v" + hashlib.sha1(version.encode()).hexdigest()[:16]


class AdapterView:
    """One registry version served by a shared base :class:`WhisperEngine` with its adapter beside it."""

    def __init__(self, engine: WhisperEngine, version: str):
        self.engine, self.model_version, self.quantized = engine, version, False

    @property
    def languages(self) -> list[str]:
        return self.engine.languages

    def transcribe(self, clips: Sequence[np.ndarray], options: TranscribeOptions = TranscribeOptions(), *,
                   on_batch: Callable[[int], None] | None = None) -> list[Transcription]:
        return self.engine.transcribe(clips, options, on_batch=on_batch, adapter=self.model_version)

    def transcribe_files(self, paths: Iterable[str], options: TranscribeOptions = TranscribeOptions(),
                         **kwargs) -> list[Transcription | audio_lib.AudioDecodeError]:
        return self.engine.transcribe_files(paths, options, adapter=self.model_version, **kwargs)

    def count_windows(self, clips: Sequence[np.ndarray]) -> int:
        return self.engine.count_windows(clips)

    def clear_cache(self) -> None:
        self.engine.clear_cache()


@dataclass
class _Window:
    item: int
    offset: float
    samples: np.ndarray

    @property
    def duration(self) -> float:
        return audio_lib.duration(self.samples)


@dataclass
class _WindowResult:
    segments: list[Segment]
    text: str
    language: str
    language_probability: float
    uncertainty: Uncertainty
    n_tokens: int
    duration: float
    speech: bool = field(default=True)
    words: list[Word] = field(default_factory=list)


class WhisperEngine:
    """Whisper with uncertainty; thread-safe (one decode at a time, cache shared)."""

    def __init__(self, settings: Settings | None = None, model: str | None = None, *, install_missing: bool = False,
                 resolved: ResolvedModel | None = None, project: int | None = None):
        """``model`` (a bundled name, a directory, a hub id) is served as is; without it (and without
        ``resolved``) the engine serves the model live for ``project``: ``WHISPER_MODEL`` plus the adapter
        the registry chose for that project (the global one, or none, when ``project`` is None)."""
        self.settings = settings or Settings.from_env()
        if resolved is None:
            resolved = (resolve_base(self.settings, model, install_missing=install_missing) if model
                        else live_model(self.settings, project, install_missing=install_missing).resolved)
        self.resolved: ResolvedModel = resolved
        self.device = pick_device(self.settings.device)
        self.quantized = quantizes(self.settings)
        self.dtype = torch.float32 if self.quantized else pick_dtype(self.settings.dtype, self.device)
        if self.device.type == "cpu" and self.settings.cpu_threads > 0:
            torch.set_num_threads(self.settings.cpu_threads)
        if self.device.type == "cuda":
            avoid_cudnn_attention()
        log.info("loading %s (%s) on %s/%s", self.resolved.name, self.resolved.version, self.device, self.dtype)

        whisper = load_whisper(self.resolved.path, dtype=self.dtype, adapter=self.resolved.adapter)
        self.tokenizer, self.feature_extractor = whisper.tokenizer, whisper.feature_extractor
        self.special = whisper.special
        model_ = whisper.model.to(self.device).eval()
        if self.quantized:
            model_ = torch.ao.quantization.quantize_dynamic(model_, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model_
        config = model_.config
        self.decoder = WhisperDecoder(
            model_, self.special, list(config.suppress_tokens or []), list(config.begin_suppress_tokens or []),
            feature_extractor=self.feature_extractor, slots=self.settings.batch_size,
        )
        heads = getattr(getattr(model_, "generation_config", None), "alignment_heads", None)
        self.aligner = WordAligner(model_, self.tokenizer, heads)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Transcription] = OrderedDict()
        self._peft: Any = None  # the peft wrapper once an adapter was added (the model is modified in place)
        self._adapters: OrderedDict[str, str] = OrderedDict()  # served version → adapter path, most recent last
        self._active_adapter: str | None = None

    @property
    def model_version(self) -> str:
        return served_version(self.resolved.version, self.quantized)

    @property
    def languages(self) -> list[str]:
        return list(self.special.languages) or ["en"]

    def with_adapter(self, version: str, adapter: str) -> AdapterView:
        """This model with LoRA ``adapter`` (a registry version's peft directory) beside it, served as ``version``.

        The adapter is loaded once, unmerged, next to the others (peft multi-adapter); each decode
        activates the one it needs under the decode lock, so one base in memory serves every project.
        """
        if self.quantized:
            raise ConfigurationError("a quantized model cannot carry unmerged adapters; serve merged models")
        if version in self._adapters:  # loaded: no lock (it may be held by a long decode)
            return AdapterView(self, version)
        with self._lock:
            if version not in self._adapters:
                self._load_adapter(version, adapter)
            self._adapters.move_to_end(version)
            while len(self._adapters) > MAX_ADAPTERS:
                evicted, _ = self._adapters.popitem(last=False)
                self._peft.delete_adapter(_adapter_name(evicted))
            self.decoder.reset()  # captured decoder graphs replay the modules they saw
        return AdapterView(self, version)

    def _load_adapter(self, version: str, adapter: str) -> None:
        from peft import PeftModel

        log.info("loading LoRA adapter %s beside %s", version, self.resolved.version)
        name = _adapter_name(version)
        with quiet_peft():
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, adapter, adapter_name=name)
            else:
                self._peft.load_adapter(adapter, adapter_name=name)
        for param_name, parameter in self.model.named_parameters():  # on the model's device and dtype
            if f".{name}." in param_name:
                parameter.data = parameter.data.to(self.device, self.dtype)
        self._peft.eval()
        self._adapters[version] = adapter

    def _activate(self, adapter: str | None) -> None:
        """Route decoding through ``adapter``'s LoRA layers, or none of them (the base). Caller holds the lock."""
        self._active_adapter = adapter
        if self._peft is None:
            if adapter is not None:
                raise ConfigurationError(f"adapter {adapter} was never added to this model")
            return
        if adapter is None:
            self._peft.base_model.disable_adapter_layers()
        else:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(_adapter_name(adapter))

    # ---- public API -------------------------------------------------------------------------

    def transcribe(
        self,
        clips: Sequence[np.ndarray],
        options: TranscribeOptions = TranscribeOptions(),
        *,
        on_batch: Callable[[int], None] | None = None,
        adapter: str | None = None,
    ) -> list[Transcription]:
        """Transcribe 16 kHz mono float32 clips; one :class:`Transcription` per clip, in order.

        ``on_batch(n_windows)`` is called after each decoded batch (progress bars). ``adapter`` names an
        adapter added with :meth:`with_adapter` (its :class:`AdapterView` passes it); None is this model.
        """
        if options.language is not None and options.language not in self.languages:
            raise ConfigurationError(f"unknown language {options.language!r} for this model")
        version = adapter or self.model_version
        keys = [self._cache_key(c, options, version) for c in clips]
        results: list[Transcription | None] = [None] * len(clips)
        with self._lock:
            for i, key in enumerate(keys):
                if key in self._cache:
                    self._cache.move_to_end(key)
                    results[i] = self._cache[key]
        todo = [i for i, r in enumerate(results) if r is None]
        first_of_key: dict[tuple, int] = {}
        for i in todo:
            first_of_key.setdefault(keys[i], i)
        unique = sorted(set(first_of_key.values()))
        if unique:
            windows = [
                _Window(i, start / audio_lib.SAMPLE_RATE, clips[i][start:end])
                for i in unique
                for start, end in audio_lib.split_at_pauses(clips[i])
            ]
            with self._lock:
                self._activate(adapter)
                decoded = self._decode_windows(windows, options, on_batch)
                for i in unique:
                    own = [(w, r) for w, r in decoded if w.item == i]
                    result = results[i] = self._assemble(own, audio_lib.duration(clips[i]), version)
                    self._cache[keys[i]] = result
                while len(self._cache) > self.settings.cache_size:
                    self._cache.popitem(last=False)
        for i in todo:
            results[i] = results[first_of_key[keys[i]]]
        return results  # type: ignore[return-value]

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def transcribe_files(
        self,
        paths: Iterable[str],
        options: TranscribeOptions = TranscribeOptions(),
        *,
        max_seconds: float | None = None,
        on_start: Callable[[int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        adapter: str | None = None,
    ) -> list[Transcription | audio_lib.AudioDecodeError]:
        """Decode and transcribe files; a file that cannot be decoded yields its error, not an exception.

        ``on_start(n_windows)`` is called once every file is decoded, ``on_batch(n)`` after each batch.
        """
        paths = list(paths)
        decoded: list[np.ndarray | audio_lib.AudioDecodeError] = []
        for p in paths:
            try:
                decoded.append(audio_lib.decode_audio(p, max_seconds=max_seconds, timeout=self.settings.ffmpeg_timeout))
            except audio_lib.AudioDecodeError as exc:
                log.warning("skipping %s", exc)
                decoded.append(exc)
        clips = [d for d in decoded if isinstance(d, np.ndarray)]
        if on_start is not None:
            on_start(self.count_windows(clips))
        texts = iter(self.transcribe(clips, options, on_batch=on_batch, adapter=adapter))
        return [d if isinstance(d, audio_lib.AudioDecodeError) else next(texts) for d in decoded]  # errors in place

    def count_windows(self, clips: Sequence[np.ndarray]) -> int:
        return sum(len(audio_lib.split_at_pauses(c)) for c in clips)

    # ---- internals ----------------------------------------------------------------------------

    def _cache_key(self, clip: np.ndarray, options: TranscribeOptions, version: str) -> tuple:
        return (audio_lib.content_hash(clip), version, options)

    def _decode_windows(
        self, windows: list[_Window], options: TranscribeOptions, on_batch: Callable[[int], None] | None
    ) -> list[tuple[_Window, _WindowResult]]:
        """Decode windows (longest first) through the decoder's slots, refilled as windows finish.

        A window that looks like a loop is queued again at the next temperature; the best attempt is
        kept. Whisper sometimes closes its last segment early and stops, leaving the end of a window
        untranscribed; openai-whisper then seeks to the last timestamp and decodes again. The same
        happens here: such a tail is queued as a window of its own.
        """
        temperatures = options.temperatures or (0.0,)
        done: list[tuple[_Window, _WindowResult]] = []
        best: dict[int, tuple[DecodedSequence, Uncertainty, DecodeResult]] = {}

        def request(window: _Window, attempt: int = 0, rounds: int = 0,
                    features: torch.Tensor | None = None) -> DecodeRequest:
            temperature = temperatures[attempt]
            return DecodeRequest(samples=window.samples, features=features, temperature=temperature,
                                 tag=(window, attempt, rounds),
                                 seed=sampling_seed(window.samples, attempt) if temperature > 0 else 0)

        def settle(result: DecodeResult) -> list[DecodeRequest]:
            window, attempt, rounds = result.request.tag
            seq, temperature = result.sequence, result.request.temperature
            u = self._signals(seq, result.posterior.no_speech_prob, temperature)
            previous = best.get(id(window))
            if previous is None or self._better(u, previous[1]):
                best[id(window)] = previous = (seq, u, result)
            if u.needs_fallback() and attempt + 1 < len(temperatures):
                return [request(window, attempt + 1, rounds, result.request.features)]
            del best[id(window)]
            seq, u, chosen = previous
            language, probability = self._language(chosen, options)
            window_result = self._window_result(window, seq, u, language, probability)
            if options.word_timestamps and window_result.speech and window_result.segments:
                encoded = chosen.encoded if chosen is result else None
                if encoded is None:  # the best attempt's slot was refilled since: encode again
                    encoded = self.decoder.encode(self.decoder.features([chosen.request]))
                window_result.words = self._words(encoded, seq, window, language, options.task)
            done.append((window, window_result))
            if on_batch and rounds == 0:  # progress counts the windows of count_windows()
                on_batch(1)
            tail = self._undecoded_tail(window, window_result)
            return [request(tail, 0, rounds + 1)] if tail is not None and rounds < MAX_TAIL_ROUNDS else []

        languages = [options.language] if options.language else options.languages
        self.decoder.run(
            [request(w) for w in sorted(windows, key=lambda w: -w.duration)], settle,
            task=options.task, timestamps=options.timestamps, languages=languages,
            words=options.word_timestamps, adapter_key=self._active_adapter,
        )
        return done

    @staticmethod
    def _undecoded_tail(window: _Window, result: _WindowResult) -> _Window | None:
        if not result.segments:  # silence, or nothing said; untimed text always ends at the window end
            return None
        end = result.segments[-1].end - window.offset
        if window.duration - end < MIN_TAIL_SECONDS:
            return None
        start = int(end * audio_lib.SAMPLE_RATE)
        return _Window(window.item, window.offset + end, window.samples[start:])

    def _language(self, result: DecodeResult, options: TranscribeOptions) -> tuple[str, float]:
        """The window's language and its probability (renormalized over the project's languages, if any)."""
        posterior = result.posterior
        if options.language:
            return options.language, posterior.probabilities.get(options.language, 1.0)
        return posterior.best(options.languages)

    def _words(self, encoded: torch.Tensor, seq: DecodedSequence, window: _Window, language: str,
               task: str) -> list[Word]:
        """The window's words with timings (cross-attention alignment) and decoded probabilities."""
        positions = [i for i, tok in enumerate(seq.tokens) if tok < self.special.eot]
        prompt = self.decoder.prompt(language if self.special.multilingual else None, task, timestamps=False)
        return self.aligner.words(encoded, prompt, [seq.tokens[i] for i in positions],
                                  [seq.logprobs[i] for i in positions], window.duration, language, window.offset)

    @staticmethod
    def _better(new: Uncertainty, old: Uncertainty) -> bool:
        """Prefer a decode that does not loop, then the more probable one."""
        if new.looks_like_repetition != old.looks_like_repetition:
            return not new.looks_like_repetition
        return new.mean_logprob > old.mean_logprob

    def _text_positions(self, seq: DecodedSequence) -> list[int]:
        """Indices into entropies/logprobs of text tokens, plus the step that chose to stop."""
        idx = [i for i, tok in enumerate(seq.tokens) if tok < self.special.eot]
        if len(seq.entropies) > len(seq.tokens):
            idx.append(len(seq.entropies) - 1)
        return idx or list(range(len(seq.entropies)))

    def _signals(self, seq: DecodedSequence, no_speech: float, temperature: float) -> Uncertainty:
        idx = self._text_positions(seq)
        entropies = [seq.entropies[i] for i in idx] or [0.0]
        logprobs = [seq.logprobs[i] for i in idx] or [0.0]
        text_tokens = [t for t in seq.tokens if t < self.special.eot]
        text = self.tokenizer.decode(text_tokens)
        return Uncertainty(
            mean_entropy=float(np.mean(entropies)),
            max_entropy=float(np.max(entropies)),
            mean_logprob=float(np.mean(logprobs)),
            no_speech_prob=float(no_speech),
            compression_ratio=compression_ratio(text),
            max_token_run=max(max_run(text_tokens), max_run(text.split())),
            temperature=temperature,
        )

    def _window_result(
        self, window: _Window, seq: DecodedSequence, u: Uncertainty, language: str, language_prob: float
    ) -> _WindowResult:
        silent = u.no_speech_prob > NO_SPEECH_THRESHOLD and u.mean_logprob < LOGPROB_THRESHOLD
        segments = [] if silent else self._segments(seq.tokens, window, language)
        text = " ".join(s.text for s in segments).strip()
        n_tokens = len(self._text_positions(seq))
        return _WindowResult(segments, text, language, language_prob, u, n_tokens, window.duration, not silent)

    def _segments(self, tokens: list[int], window: _Window, language: str) -> list[Segment]:
        """Split timestamped tokens into segments; untimed text becomes one segment for the window."""
        tb, eot = self.special.timestamp_begin, self.special.eot
        segments: list[Segment] = []
        start: float | None = None
        pending: list[int] = []

        def close(end: float) -> None:
            text = self.tokenizer.decode(pending).strip()
            if text:
                s = start if start is not None else (segments[-1].end - window.offset if segments else 0.0)
                e = min(max(end, s), window.duration)
                segments.append(Segment(round(window.offset + s, 3), round(window.offset + e, 3), text, language))

        for tok in tokens:
            if tok >= tb:
                time = (tok - tb) * TIME_PRECISION
                if pending:
                    close(time)
                    pending, start = [], None
                else:
                    start = time
            elif tok < eot:
                pending.append(tok)
        if pending:
            close(window.duration)
        return segments

    def _assemble(self, parts: list[tuple[_Window, _WindowResult]], total_duration: float,
                  version: str) -> Transcription:
        parts.sort(key=lambda p: p[0].offset)
        results = [r for _, r in parts]
        spoken = [r for r in results if r.text] or results
        by_language: dict[str, float] = {}
        for r in spoken:
            by_language[r.language] = by_language.get(r.language, 0.0) + r.duration
        language = max(by_language, key=by_language.__getitem__)
        same = [r for r in spoken if r.language == language]
        language_prob = sum(r.language_probability * r.duration for r in same) / max(
            sum(r.duration for r in same), 1e-9
        )
        tokens = np.array([max(r.n_tokens, 1) for r in results], dtype=float)
        durations = np.array([r.duration for r in results])
        u = Uncertainty(
            mean_entropy=float(np.average([r.uncertainty.mean_entropy for r in results], weights=tokens)),
            max_entropy=max(r.uncertainty.max_entropy for r in results),
            mean_logprob=float(np.average([r.uncertainty.mean_logprob for r in results], weights=tokens)),
            no_speech_prob=float(np.average([r.uncertainty.no_speech_prob for r in results], weights=durations)),
            compression_ratio=max(r.uncertainty.compression_ratio for r in results),
            max_token_run=max(r.uncertainty.max_token_run for r in results),
            temperature=max(r.uncertainty.temperature for r in results),
        )
        # A clip is as uncertain as its least certain spoken window.
        score = min(confidence(r.uncertainty) for r in spoken)
        segments = tuple(s for r in results for s in r.segments)
        words = tuple(w for r in results for w in r.words)
        text = " ".join(r.text for r in results if r.text)
        return Transcription(
            text=text,
            language=language,
            language_probability=float(language_prob),
            confidence=score,
            duration=round(total_duration, 3),
            segments=segments,
            uncertainty=u,
            model_version=version,
            words=words,
        )
