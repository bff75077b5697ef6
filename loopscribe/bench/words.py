"""``loopscribe bench words``: do the "Model unsure" regions point at real errors?

Each clip with a reference transcript is transcribed with word timings as served. Its words are
aligned to the reference (jiwer, on normalized text): a word is wrong when it is substituted or
inserted, or a reference word is missing right after it. Each stretch of words below the threshold
becomes a region, as predictions carry them; per threshold the benchmark prints

- precision: the share of regions that hold at least one wrong word (is listening there worth it?);
- recall: the share of wrong words inside some region (how many errors the regions point at);
- regions per minute of audio and the share of audio they cover (how much there is to listen to).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ml_backend.settings import Settings
from ml_backend.transcription import Transcription

from ..demo import ReferenceClip, load, shared_clips

THRESHOLDS = (0.3, 0.5, 0.7)


@dataclass
class WordsRow:
    threshold: float
    regions: int
    regions_with_error: int
    wrong_words: int
    wrong_words_flagged: int
    region_seconds: float
    audio_seconds: float

    @property
    def precision(self) -> float:
        return self.regions_with_error / self.regions if self.regions else float("nan")

    @property
    def recall(self) -> float:
        return self.wrong_words_flagged / self.wrong_words if self.wrong_words else float("nan")


def wrong_words(t: Transcription, reference: str) -> list[bool]:
    """For each of ``t.words``: is it wrong against ``reference`` (normalized, aligned with jiwer)?"""
    import jiwer

    from ml_backend.text import normalize

    owners: list[int] = []
    hypothesis: list[str] = []
    for i, word in enumerate(t.words):
        for token in normalize(word.text).split():
            hypothesis.append(token)
            owners.append(i)
    wrong = [False] * len(t.words)
    ref = normalize(reference).split()
    if not ref or not hypothesis:
        return [bool(hypothesis)] * len(t.words)
    for chunk in jiwer.process_words(" ".join(ref), " ".join(hypothesis)).alignments[0]:
        if chunk.type in ("substitute", "insert"):
            for k in range(chunk.hyp_start_idx, chunk.hyp_end_idx):
                wrong[owners[k]] = True
        elif chunk.type == "delete" and owners:
            wrong[owners[max(0, chunk.hyp_start_idx - 1)]] = True  # listen where the missing words were
    return wrong


def score(transcripts: list[Transcription], references: list[str], threshold: float) -> WordsRow:
    from ml_backend.alignment import unsure_stretches

    row = WordsRow(threshold, 0, 0, 0, 0, 0.0, sum(t.duration for t in transcripts))
    for t, reference in zip(transcripts, references):
        wrong = wrong_words(t, reference)
        row.wrong_words += sum(wrong)
        flagged = [False] * len(t.words)
        for start, end, _ in unsure_stretches(t.words, threshold):
            inside = [i for i, w in enumerate(t.words) if start <= w.start and w.end <= end]
            row.regions += 1
            row.region_seconds += end - start
            row.regions_with_error += any(wrong[i] for i in inside)
            for i in inside:
                flagged[i] = True
        row.wrong_words_flagged += sum(f and w for f, w in zip(flagged, wrong))
    return row


def corpus_clips(folder: Path, limit: int) -> list[ReferenceClip]:
    meta = json.loads((folder / "transcripts.json").read_text())
    return [ReferenceClip(folder / name, m["text"], m.get("language", "en")) for name, m in list(meta.items())[:limit]]


def bench_words(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.engine import WhisperEngine

    clips = corpus_clips(args.corpus, args.limit) if args.corpus else shared_clips()
    engine = WhisperEngine(settings, install_missing=True)
    transcripts = engine.transcribe([load(c.path) for c in clips])
    references = [c.text for c in clips]
    source = f"{args.corpus} (first {len(clips)})" if args.corpus else f"{len(clips)} shared real recordings"
    words = sum(len(t.words) for t in transcripts)
    print(f"{engine.model_version} on {source}: {words} words, "
          f"{sum(t.duration for t in transcripts) / 60:.1f} min of audio")
    print(f"{'threshold':>9s} {'regions':>8s} {'precision':>9s} {'recall':>7s} {'wrong words':>11s} "
          f"{'per min':>7s} {'audio covered':>13s}")
    rows = [score(transcripts, references, th) for th in args.threshold or THRESHOLDS]
    for r in rows:
        minutes = r.audio_seconds / 60
        print(f"{r.threshold:9.2f} {r.regions:8d} {r.precision:9.2f} {r.recall:7.2f} {r.wrong_words:11d} "
              f"{r.regions / minutes:7.1f} {r.region_seconds / r.audio_seconds:13.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"precision": r.precision, "recall": r.recall}
                                               for r in rows], indent=2))
    return 0
