"""``loopscribe bench uncertainty``: does low confidence find the utterances the model gets wrong?

Uncertainty sampling only saves annotators time if the ranking signal tracks real errors.
On clips with reference transcripts (the real recordings plus espeak-ng speech made hard
on purpose: noise, speed, the wrong voice, invented product names) each utterance is
transcribed once; every signal is then scored against its utterance error rate:

- Spearman rank correlation between the signal (higher = less sure) and WER (CER for zh/ja/…);
- AUROC for telling utterances with any error (WER > 0) from perfect ones.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ml_backend.settings import Settings
from ml_backend.transcription import Transcription

from ..demo import (
    SENTENCES,
    ReferenceClip,
    load,
    shared_clips,
    speak,
    with_noise,
    write_wav,
)
from .synth import VOCABULARY, vocabulary_clips

# Each signal as "higher = less sure", so all are read the same way.
SIGNALS: dict[str, Callable[[Transcription], float]] = {
    "1 - confidence (served)": lambda t: 1.0 - t.confidence,
    "mean entropy": lambda t: t.uncertainty.mean_entropy,
    "max entropy": lambda t: t.uncertainty.max_entropy,
    "-mean logprob": lambda t: -t.uncertainty.mean_logprob,
    "no-speech prob": lambda t: t.uncertainty.no_speech_prob,
}


@dataclass(frozen=True)
class SignalScore:
    signal: str
    spearman: float
    auroc: float


def hard_variants(out_dir: Path) -> list[ReferenceClip]:
    """Every espeak sentence clean and made hard (noise at 10/5/0 dB, fast, slow and low, another
    language's voice): deterministic, so re-runs score the same audio."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for lang, sentences in SENTENCES.items():
        other_voice = "de" if lang == "en" else "en"
        for i, text in enumerate(sentences):
            clean = out_dir / f"{lang}{i}_clean.wav"
            if not clean.exists():
                speak(text, lang, clean)
            clips.append(ReferenceClip(clean, text, lang))
            for name, kwargs in (("fast", dict(speed=260)), ("slow", dict(speed=95, pitch=20)),
                                 ("voice", dict(voice=other_voice))):
                path = out_dir / f"{lang}{i}_{name}.wav"
                if not path.exists():
                    speak(text, lang, path, **kwargs)
                clips.append(ReferenceClip(path, text, lang))
            for snr in (10, 5, 0):
                path = out_dir / f"{lang}{i}_snr{snr}.wav"
                if not path.exists():
                    write_wav(with_noise(load(clean), snr_db=float(snr), seed=snr * 100 + i), path)
                clips.append(ReferenceClip(path, text, lang))
    return clips


def uncertainty_pool(cache_dir: Path, vocabulary: int = 24) -> list[ReferenceClip]:
    vocab = [ReferenceClip(c.path, c.text, c.language) for c in vocabulary_clips(cache_dir / "vocab", vocabulary)]
    return shared_clips() + hard_variants(cache_dir / "hard") + vocab


def score_signals(transcriptions: list[Transcription], errors: list[float]) -> list[SignalScore]:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    wrong = [e > 0 for e in errors]
    scores = []
    for name, signal in SIGNALS.items():
        values = [signal(t) for t in transcriptions]
        rho = spearmanr(values, errors).statistic if len(set(values)) > 1 else math.nan
        auroc = roc_auc_score(wrong, values) if 0 < sum(wrong) < len(wrong) else math.nan
        scores.append(SignalScore(name, float(rho), float(auroc)))
    return scores


def bench_uncertainty(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from ml_backend.engine import WhisperEngine
    from training.metrics import error_rate

    clips = uncertainty_pool(settings.home / "cache" / "uncertainty", vocabulary=args.vocabulary)
    engine = WhisperEngine(settings, install_missing=True)
    transcriptions: list[Transcription] = []
    for clip in tqdm(clips, desc="transcribing", unit="clip", disable=args.quiet):
        transcriptions.extend(engine.transcribe([load(clip.path)]))
    errors = [error_rate([c.text], [t.text], c.language) for c, t in zip(clips, transcriptions)]
    wrong = sum(e > 0 for e in errors)
    real = len(shared_clips())
    print(f"{len(clips)} utterances ({real} real, {len(clips) - real} espeak-ng "
          f"incl. {args.vocabulary} with invented names {', '.join(VOCABULARY[:3])}…), model {engine.model_version}")
    print(f"utterances with errors: {wrong} of {len(clips)}; mean utterance error rate "
          f"{sum(errors) / len(errors):.3f}\n")
    scores = score_signals(transcriptions, errors)
    print(f"{'signal (higher = less sure)':28s} {'Spearman':>9s} {'AUROC':>7s}")
    for s in scores:
        print(f"{s.signal:28s} {s.spearman:9.3f} {s.auroc:7.3f}")
    if args.json:
        rows = [{"file": str(c.path), "language": c.language, "reference": c.text, "hypothesis": t.text,
                 "error_rate": e, "confidence": t.confidence, **asdict(t.uncertainty)}
                for c, t, e in zip(clips, transcriptions, errors)]
        args.json.write_text(json.dumps({"scores": [asdict(s) for s in scores], "utterances": rows}, indent=1,
                                        ensure_ascii=False))
        print(f"\nper-utterance details: {args.json}")
    return 0
