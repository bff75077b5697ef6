"""``loopscribe bench loop``: does entropy ranking plus LoRA beat random selection?

A simulation of annotators on the real code path, with Label Studio in the loop (needs
``loopscribe up``). For each strategy a scratch project gets the same pool of clips with
ground truth, pre-annotated by the base model; then, round after round:

1. ``k`` tasks are chosen: ``entropy`` takes what Label Studio's ``/next`` serves (uncertainty
   sampling over the live model's confidence, the product's ranking); ``random`` draws from
   the unlabeled tasks with a fixed seed; ``diverse`` takes the same gate sample ``/next`` serves
   first, then one clip per cluster of the least confident (:func:`diverse_picks`); ``skip`` takes
   the gate sample, then the least confident after skipping the hopeless bottom of the ranking
   (:func:`skip_picks`);
2. each is "annotated" with its ground truth through Label Studio's API (as an annotator
   correcting the prediction would);
3. as in the product, the annotated tasks the hash puts in the held-out split
   (``HELDOUT_FRACTION``; ``HELDOUT_AHEAD``/``HELDOUT_AHEAD_TASKS`` of them served first by ``/next``) are not trained
   on: a LoRA adapter is trained on the others (the retraining job's recipe), and the product's
   gate compares it with the live model on the project's annotated held-out tasks and on the
   general-speech regression set (``REGRESSION_AUDIO``; by default, as in ``up``, the bundled
   LJ Speech set and the shared recordings); it goes live only when the gate promotes it, and
   for ``entropy`` a promotion re-scores the unlabeled tasks so the next ``/next`` ranks by the
   new model.

The curve is the live model's error on a large independent held-out set (clips never in the
pool); each candidate's own error is kept beside it (``loop.json``), and so is the decision the
same gate rule would take on that large set, so the summary can count how often the product's
gate, on the few tasks annotators held out, agrees with it.

The pool (:func:`loop_pool`) mixes sentences around invented product names, in varied
conditions, with speech base Whisper already gets right and a few hopeless clips.

With ``--corpus DIR`` (real recordings: ``transcripts.json`` and ``speakers.json``, see
:mod:`loopscribe.bench.corpus`) the pool and the held-out set are real speech instead, split
by speaker so the held-out speakers are never heard in training; each of ``--seeds`` seeds draws
its own split and pool, both strategies run on the same one, and every point is reported as
the mean over seeds with a 95 % interval (t distribution), plus the label saving. The held-out
error is also measured with the language forced at the start and the end, so learning is told
apart from fixing the detected language, and once more greedily (no temperature fallback): the
fallback's sampled attempts move a reading by a few points, and a relative drop divides by one.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import requests

from ml_backend.settings import Settings

from ..demo import ReferenceClip, load, shared_clips
from ..paths import LABEL_CONFIG
from . import with_regression_set
from .synth import TEMPLATES, domain_clips, template_of
from .uncertainty import hard_variants

STRATEGIES = ("entropy", "random")  # the default comparison; "diverse" and "skip" on request
DIVERSE_CANDIDATES = 3  # diverse: clusters are drawn from the least confident 3 × k unlabeled tasks
SKIP_SHARE = 0.15  # skip: the least confident 15 % of the ranked unlabeled tasks are passed over as hopeless


@dataclass
class ShrunkRound:
    """A round whose adapter the gate shrank for general speech: what shrinking gave up and what it saved."""

    round: int
    strength: float
    error: float  # the model the gate ended with, on the large held-out set
    error_as_trained: float  # the adapter as trained, on the same set
    general: tuple[float, float] | None  # general speech: the live model, the shrunk adapter
    general_as_trained: float | None  # general speech, the adapter as trained


@dataclass
class Curve:
    strategy: str
    points: list[tuple[int, float]] = field(default_factory=list)  # (corrections, held-out error of the live model)
    candidates: list[float] = field(default_factory=list)  # held-out error of each round's candidate, gated or not
    seconds: float = 0.0
    seed: int = 0
    decisions: list[str] = field(default_factory=list)  # the product's gate each round, on the project's held-out
    independent: list[str] = field(default_factory=list)  # the same rule on the large independent held-out set
    independent_evidence: list[str] = field(default_factory=list)  # its paired comparison there, in words (p
    # included, so a run at one PROMOTE_CONFIDENCE can be read at another)
    gate_items: list[int] = field(default_factory=list)  # annotated held-out tasks the product's gate had
    gate_evidence: list[str] = field(default_factory=list)  # the gate's paired comparison on those, in words
    # (gain, lower bound, items better/worse), or why there was none: what a decision rested on
    gate_power: list[float | None] = field(default_factory=list)  # share of random subsets of the large held-out
    # set, as many utterances as the gate had, on which the held-out rule promotes the candidate (None: no gate)
    # (product's gate, same rule on the large set) on held-out evidence alone, without the general-speech check:
    # whether the gate's sample is big enough, apart from forgetting
    evidence: list[tuple[str, str]] = field(default_factory=list)
    forced: tuple[float, float] | None = None  # live model's held-out error with the language forced: first, last
    forced_greedy: tuple[float, float] | None = None  # the same, decoded greedily: no fallback draws in either
    candidates_forced: list[float] = field(default_factory=list)  # each candidate's, with the language forced
    general: list[tuple[float, float]] = field(default_factory=list)  # regression set (live, candidate) per round
    wrong_language: list[int] = field(default_factory=list)  # held-out utterances heard in another language:
    # the base model, then each round's candidate
    strengths: list[float] = field(default_factory=list)  # each candidate's adapter strength: 1 as trained, less
    # when the gate shrank it for general speech (REGRESSION_RETRY_STRENGTH)
    retried: list[bool] = field(default_factory=list)  # whether the gate tried the adapter shrunk, each round
    shrunk: list[ShrunkRound] = field(default_factory=list)  # rounds whose adapter the gate shrank

    def corrections_to_reach(self, target: float) -> float | None:
        """Corrections at which the curve first reaches ``target`` (linear between rounds); None if never."""
        if self.points and self.points[0][1] <= target:
            return float(self.points[0][0])
        for (n0, e0), (n1, e1) in zip(self.points, self.points[1:]):
            if e1 <= target:  # e0 > target >= e1
                return n0 + (n1 - n0) * (e0 - target) / (e0 - e1)
        return None


HELDOUT_TEMPLATES = 3  # the last sentence templates: held-out only, so held-out sentences are never trained on


def loop_pool(cache: Path, pool_domain: int, heldout_domain: int) -> tuple[list[ReferenceClip], list[ReferenceClip]]:
    """(pool, held-out), disjoint down to the sentence.

    Pool: sentences with invented product names in varied conditions (what corrections can
    teach), every espeak sentence clean and slow (base Whisper mostly gets these right, so
    annotating them teaches little) and a few hopeless ones (0 dB noise, another language's
    voice: wrong, and not learnable from a decoder adapter). Held-out: the same product names
    in sentence templates the pool never uses, in the same conditions, plus the real
    recordings (to see forgetting).
    """
    heldout_templates = set(range(len(TEMPLATES) - HELDOUT_TEMPLATES, len(TEMPLATES)))
    domain_pool: list[ReferenceClip] = []
    domain_heldout: list[ReferenceClip] = []
    index = 0
    while len(domain_pool) < pool_domain or len(domain_heldout) < heldout_domain:
        side = domain_heldout if template_of(index) in heldout_templates else domain_pool
        if len(side) < (heldout_domain if side is domain_heldout else pool_domain):
            c = domain_clips(cache / "domain", 1, offset=index)[0]
            side.append(ReferenceClip(c.path, c.text, c.language))
        index += 1
    variants = hard_variants(cache / "hard")
    easy = [c for c in variants if c.path.stem.endswith(("_clean", "_slow"))]
    hopeless = [c for c in variants if c.path.stem.endswith(("_snr0", "_voice")) and c.path.stem[2] == "0"]
    real = [c for c in shared_clips() if c.path.name != "mit_license_en_de.mp3"]  # 60 s: costly every round
    return domain_pool + easy + hopeless, domain_heldout + real


def _next_task(settings: Settings, project: int) -> int | None:
    """Label Studio's own choice (``/next`` serves the same task until it is annotated); None when none is left."""
    r = requests.get(f"{settings.label_studio_url}/api/projects/{project}/next",
                     headers={"Authorization": f"Token {settings.label_studio_api_key}"}, timeout=30)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return int(r.json()["id"])


def audio_embeddings(engine, clips: list[ReferenceClip]) -> dict[str, np.ndarray]:
    """Per clip, the unit-length mean of the base encoder's output over the frames that hold audio:
    who speaks and how (voice, accent, channel) more than what is said."""
    import torch

    from ml_backend.audio import SAMPLE_RATE, WINDOW_SECONDS
    from ml_backend.decoding import DecodeRequest

    window = int(WINDOW_SECONDS * SAMPLE_RATE)
    out = {}
    with torch.inference_mode():
        for clip in clips:
            samples = load(clip.path)[:window]
            encoded = engine.decoder.encode(engine.decoder.features([DecodeRequest(samples=samples)]))[0]
            frames = max(1, round(encoded.shape[0] * samples.size / window))  # the window's frames that hold audio
            vector = encoded[:frames].float().mean(0).cpu().numpy()
            out[clip.path.name] = vector / (np.linalg.norm(vector) or 1.0)
    return out


def latest_scores(ls, project: int) -> dict[int, float]:
    """Each task's serving score under the project's current model version (what ``/next`` ranks by)."""
    version = ls.projects.get(id=project).model_version
    return {p.task: float(p.score) for p in ls.predictions.list(project=project)
            if p.model_version == version and p.task is not None and p.score is not None}


def _gate_sample_first(unlabeled: list[int], scores: dict[int, float], k: int) -> tuple[list[int], list[int]]:
    """(up to ``k`` tasks of the product's gate sample, as ``/next`` serves them first: the tasks whose serving score
    lies in the ahead band; the other unlabeled tasks, least confident first)."""
    from ml_backend.splits import POOL_BAND

    by_score = sorted(unlabeled, key=lambda t: (scores.get(t, 0.0), t))
    gate_sample = {t for t in unlabeled if t in scores and scores[t] < POOL_BAND[0]}
    return [t for t in by_score if t in gate_sample][:k], [t for t in by_score if t not in gate_sample]


def skip_picks(unlabeled: list[int], scores: dict[int, float], k: int, share: float = SKIP_SHARE) -> list[int]:
    """``k`` tasks: the gate sample first, then the least confident, passing over the least confident ``share`` of
    the ranked tasks. Whisper's own alarms (text over probable silence, loops) push a clip's confidence to the
    bottom of the ranking (:func:`ml_backend.uncertainty.confidence`), and so do fluent inventions; the hypothesis
    tested is that such clips teach less per annotation than the next least confident. When fewer than ``k``
    remain past the skipped ones, the skipped are taken after all (the pool is finite)."""
    picks, ranked = _gate_sample_first(unlabeled, scores, k)
    skipped = round(len(ranked) * share)
    return (picks + ranked[skipped:] + ranked[:skipped])[:k]


def diverse_picks(unlabeled: list[int], scores: dict[int, float], embeddings: dict[int, np.ndarray], k: int,
                  seed: int) -> list[int]:
    """``k`` tasks: the product's gate sample first (the tasks whose serving score lies in the band ``/next``
    serves ahead of the ranking), then the least confident ``DIVERSE_CANDIDATES`` × the rest, clustered (k-means
    on :func:`audio_embeddings`), and the least confident task of each cluster, so one round does not spend its k
    on near-identical clips."""
    from sklearn.cluster import KMeans

    picks, ranked = _gate_sample_first(unlabeled, scores, k)
    rest = k - len(picks)
    candidates = ranked[: DIVERSE_CANDIDATES * rest]
    if rest <= 0 or not candidates:
        return picks
    if len(candidates) <= rest:
        return picks + candidates
    points = np.stack([embeddings[t] for t in candidates])
    labels = KMeans(n_clusters=rest, n_init=4, random_state=seed).fit_predict(points)
    firsts: dict[int, int] = {}  # cluster → its least confident task, in the candidates' order
    for task, label in zip(candidates, labels):  # candidates run least confident first
        firsts.setdefault(int(label), task)
    return picks + list(firsts.values())


def corpus_split(root: Path, seed: int, pool_size: int, heldout_size: int,
                 heldout_speakers: float = 0.2) -> tuple[list[ReferenceClip], list[ReferenceClip]]:
    """(pool, held-out) from a corpus folder, speaker-disjoint: a seeded ``heldout_speakers`` share of the
    speakers is held out, and both sides are seeded samples of their utterances."""
    from .corpus import load_corpus

    clips, speakers = load_corpus(root)
    rng = random.Random(seed)
    voices = sorted(set(speakers.values()))
    rng.shuffle(voices)
    held_voices = set(voices[: max(1, round(len(voices) * heldout_speakers))])
    held = [ReferenceClip(p, t, lang) for p, t, lang in clips if speakers[p.name] in held_voices]
    pool = [ReferenceClip(p, t, lang) for p, t, lang in clips if speakers[p.name] not in held_voices]
    rng.shuffle(held)
    rng.shuffle(pool)
    return pool[:pool_size], held[:heldout_size]


def run_strategy(strategy: str, args: argparse.Namespace, settings: Settings, ls, base_engine,
                 pool: list[ReferenceClip], heldout_examples, media: Path, seed: int = 0) -> Curve:
    from ml_backend.engine import WhisperEngine
    from ml_backend.label_config import restrict_languages
    from ml_backend.model_store import resolve_base
    from ml_backend.splits import heldout_by_hash
    from ml_backend.transcription import TranscribeOptions
    from training import gate
    from training.dataset import Example
    from training.evaluate import evaluate
    from training.lora import train_lora
    from training.pipeline import gate_options, judge, regression_check, training_arguments

    from .. import labelstudio

    started = time.perf_counter()
    truth = {c.path.name: c for c in pool}
    config = LABEL_CONFIG.read_text()
    if args.languages:  # as `project create --languages`: the backend predicts only those
        config = restrict_languages(config, args.languages)
    served = gate_options(args.languages or ())  # how the project's tasks are transcribed, and the gate's too
    project = labelstudio.create_project(ls, f"bench loop {strategy} s{seed} {time.strftime('%H%M%S')}", config)
    curve = Curve(strategy, seed=seed)
    work = Path(tempfile.mkdtemp(prefix="bench-loop-", dir=settings.home))
    rng = random.Random(seed)
    forced = TranscribeOptions(language=args.force_language, word_timestamps=False) if args.force_language else None
    greedy = replace(forced, temperatures=(0.0,)) if forced else None  # before forced may give way to served
    if forced == served:
        forced = None  # the project already forces that language: "as served" is "forced"

    def forced_error(engine, served_report) -> float:
        """``engine``'s held-out error with the language forced; the served one when serving forces it."""
        return evaluate(engine, heldout_examples, forced).error_rate if forced else served_report.error_rate
    try:
        labelstudio.import_audio(ls, settings, project, [c.path for c in pool], media_root=media, progress=False)
        labelstudio.predict_project(ls, settings, project, base_engine, progress=False)  # content-hash cache: fast
        live_report = evaluate(base_engine, heldout_examples, served)
        live_error, live_engine = live_report.error_rate, None
        curve.wrong_language.append(wrong_language(live_report))
        forced_first = forced_error(base_engine, live_report) if args.force_language else None
        greedy_first = evaluate(base_engine, heldout_examples, greedy).error_rate if greedy else None
        curve.points.append((0, live_error))
        print(f"  {strategy:8s} seed {seed} round 0: {0:4d} corrections, held-out error {live_error:.3f}"
              + (f" (language forced: {forced_first:.3f})" if forced_first is not None else ""), flush=True)
        train: list[Example] = []
        held: list[Example] = []  # annotated tasks of the project's held-out split: the product's gate sample
        tasks = list(ls.tasks.list(project=project, fields="task_only"))
        unlabeled = sorted(t.id for t in tasks)
        base = resolve_base(settings)
        if strategy == "diverse":
            by_name = audio_embeddings(base_engine, pool)
            embeddings = {t.id: by_name[Path(t.data["source_file"]).name] for t in tasks}
        for round_ in range(1, args.rounds + 1):
            chosen: list[ReferenceClip] = []
            planned: list[int] = []  # diverse and skip choose the round's k up front; entropy asks /next each time
            if strategy == "diverse":
                planned = diverse_picks(unlabeled, latest_scores(ls, project), embeddings, args.k, seed)
            elif strategy == "skip":
                planned = skip_picks(unlabeled, latest_scores(ls, project), args.k)
            for _ in range(args.k):
                if strategy == "entropy":
                    picked = _next_task(settings, project)
                elif strategy in ("diverse", "skip"):
                    picked = planned.pop(0) if planned else None
                else:
                    picked = rng.choice(unlabeled) if unlabeled else None
                if picked is None:
                    break
                unlabeled.remove(picked)
                task = ls.tasks.get(id=picked)
                clip = truth[Path(task.data["source_file"]).name]
                labelstudio.submit_transcript(ls, task, clip.text, clip.language)
                example = Example(task.id, load(clip.path), clip.text, clip.language)
                (held if heldout_by_hash(project, task.id, settings.heldout_fraction) else train).append(example)
                chosen.append(clip)
            if not train:  # every pick so far was held out: nothing to learn from yet
                curve.candidates.append(live_error)
                curve.decisions.append("no training data")
                curve.independent.append("no training data")
                curve.independent_evidence.append("no training data")
                curve.gate_items.append(len(held))
                curve.gate_evidence.append("no training data")
                curve.gate_power.append(None)
                curve.points.append((len(train) + len(held), live_error))
                continue
            live_adapter = live_engine.resolved.adapter if live_engine else None  # what a warm start begins as
            args_ = training_arguments(settings, live_adapter, seed=seed)
            result = train_lora(base.path, train, args_, work / f"{round_}", progress=False)
            candidate = replace(base, version=f"{base.version}-bench-{strategy}-{seed}-{round_}",
                                adapter=str(result.adapter_dir), base_version=base.version)
            # the product's gate, on the project's annotated held-out tasks and the regression set; the large
            # held-out set then measures the model it ended with (the adapter as trained, or shrunk)
            general = None
            if len(held) < max(1, settings.heldout_min_items):
                outcome = held_only = "too few held-out"
                curve.gate_evidence.append(f"{len(held)} held-out tasks, fewer than HELDOUT_MIN_ITEMS")
                engine, strength = WhisperEngine(settings, resolved=candidate), 1.0
                curve.retried.append(False)
            else:
                verdict = judge(settings, live_engine or base_engine, candidate, held, served, work / f"{round_}-gate")
                engine, strength, general = verdict.engine, verdict.strength, verdict.decision.regression
                outcome = verdict.decision.outcome
                held_only = gate.decide(verdict.decision.comparison, settings).outcome
                curve.gate_evidence.append(verdict.decision.comparison.describe())
                curve.retried.append(verdict.retried)
            curve.strengths.append(strength)
            report = evaluate(engine, heldout_examples, served)
            curve.wrong_language.append(wrong_language(report))
            if forced_first is not None:  # learning apart from fixing the detected language, promoted or not
                curve.candidates_forced.append(forced_error(engine, report))
            if general is None:  # forgetting, measured for every candidate
                general = regression_check(settings, live_engine or base_engine, engine, served)
            if general is not None:
                curve.general.append((general.live_error, general.candidate_error))
            if strength < 1:
                as_trained = verdict.full_strength.regression if verdict.full_strength else None
                curve.shrunk.append(ShrunkRound(
                    round_, strength, report.error_rate,
                    evaluate(WhisperEngine(settings, resolved=candidate), heldout_examples, served).error_rate,
                    (general.live_error, general.candidate_error) if general else None,
                    as_trained.candidate_error if as_trained else None))
            on_large = gate.compare(live_report.counts(), report.counts(), settings.promote_confidence)
            curve.gate_power.append(gate_power(live_report.counts(), report.counts(), len(held), settings, seed)
                                    if outcome != "too few held-out" else None)
            independent = gate.decide(on_large, settings, general).outcome
            curve.evidence.append((held_only, gate.decide(on_large, settings).outcome))
            promoted = outcome == gate.PROMOTE
            curve.candidates.append(report.error_rate)
            curve.decisions.append(outcome)
            curve.independent.append(independent)
            curve.independent_evidence.append(on_large.describe("large-set utterances"))
            curve.gate_items.append(len(held))
            if promoted:
                live_report, live_error, live_engine = report, report.error_rate, engine
            curve.points.append((len(train) + len(held), live_error))
            vocab_share = sum(c.path.name.startswith("domain_") for c in chosen)
            picks = "" if args.corpus else f"{vocab_share}/{len(chosen)} picks had invented names; "
            shrunk = ""
            if strength < 1:
                shrunk = f" at strength {strength:g} (as trained {curve.shrunk[-1].error_as_trained:.3f})"
            also = (shrunk
                    + (f"; language forced {curve.candidates_forced[-1]:.3f}" if forced is not None else "")
                    + (f"; general speech {general.live_error:.3f} → {general.candidate_error:.3f}" if general
                       else ""))
            print(f"  {strategy:8s} seed {seed} round {round_}: {len(train)} trained + {len(held)} held out, "
                  f"candidate {report.error_rate:.3f}{also} {outcome} (large set: {independent}), live "
                  f"{live_error:.3f} ({picks}{result.steps} steps {result.seconds:.0f} s"
                  f"{', from the live adapter' if result.warm_started else ''})", flush=True)
            power = curve.gate_power[-1]
            print(f"    gate: {curve.gate_evidence[-1]}"
                  + (f"; {len(held)} of the large set's utterances, drawn at random, promote it in {power:.0%} "
                     "of draws" if power is not None else ""), flush=True)
            print(f"    large set: {curve.independent_evidence[-1]}", flush=True)
            if promoted and strategy != "random" and round_ < args.rounds:  # re-scored after a promotion only
                labelstudio.predict_project(ls, settings, project, engine, only_unlabeled=True, progress=False)
            del engine
            gc.collect()
        if forced_first is not None:
            curve.forced = (forced_first, forced_error(live_engine or base_engine, live_report))
        if greedy is not None and greedy_first is not None:
            curve.forced_greedy = (greedy_first,
                                   evaluate(live_engine or base_engine, heldout_examples, greedy).error_rate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            ls.projects.delete(id=project)
    curve.seconds = time.perf_counter() - started
    return curve


POWER_DRAWS = 200  # random subsets per candidate for :func:`gate_power`
POWER_RESAMPLES = 500  # bootstrap resamples in each (the gate itself uses gate.RESAMPLES)


def gate_power(live: list[tuple[int, int]], candidate: list[tuple[int, int]], items: int, settings: Settings,
               seed: int) -> float | None:
    """How likely a gate of ``items`` utterances was to promote this candidate: the share of random
    ``items``-subsets of the large held-out set (per-utterance ``(errors, reference units)`` of both models) on
    which the gate's held-out rule says "promoted". Near 1: the gate's sample is big enough for a difference of
    this size; near 0.5 or below: its "inconclusive" says more about its sample than about the candidate.
    None when the large set has fewer utterances than ``items`` or ``items`` is 0."""
    from training import gate

    if not 0 < items <= len(live):
        return None
    rng = np.random.default_rng(seed)
    promoted = 0
    for draw in range(POWER_DRAWS):
        picks = rng.choice(len(live), size=items, replace=False)
        comparison = gate.compare([live[i] for i in picks], [candidate[i] for i in picks],
                                  settings.promote_confidence, resamples=POWER_RESAMPLES, seed=draw)
        promoted += gate.decide(comparison, settings).outcome == gate.PROMOTE
    return promoted / POWER_DRAWS


def wrong_language(report) -> int:
    """Utterances the model heard in another language than they are in."""
    return sum(e["detected_language"] not in (None, e["language"]) for e in report.examples)


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % interval (t distribution over seeds; the mean alone for one seed)."""
    from scipy import stats

    arr = np.array(values, dtype=float)
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size))
    return mean, mean - half, mean + half


def mean_relative_drop(pairs: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """:func:`mean_interval` of ``(first - last) / first`` over (first, last) readings of the runs that have a
    first reading (None when none does)."""
    drops = [(first - last) / first for first, last in pairs if first]
    return mean_interval(drops) if drops else None


def mean_curve(curves: list[Curve]) -> Curve:
    """Seeds averaged point by point (every seed has the same rounds and k)."""
    rounds = min(len(c.points) for c in curves)
    points = [(curves[0].points[i][0], float(np.mean([c.points[i][1] for c in curves]))) for i in range(rounds)]
    return Curve(curves[0].strategy, points)


def plot(curves: list[Curve], path: Path) -> None:
    """Mean live curve per strategy with its 95 % band over seeds; candidates' means dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for strategy in dict.fromkeys(c.strategy for c in curves):
        runs = [c for c in curves if c.strategy == strategy]
        rounds = min(len(c.points) for c in runs)
        xs = [runs[0].points[i][0] for i in range(rounds)]
        stats = [mean_interval([c.points[i][1] for c in runs]) for i in range(rounds)]
        line, = ax.plot(xs, [m for m, _, _ in stats], marker="o", label=f"{strategy} (live, {len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(xs, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], color=line.get_color(),
                            alpha=0.15)
        cands = [float(np.mean([c.candidates[i] for c in runs])) for i in range(rounds - 1)]
        ax.plot(xs[1:], cands, linestyle="--", marker="x", alpha=0.6, color=line.get_color(),
                label=f"{strategy} (candidate)")
    ax.set_xlabel("corrections")
    ax.set_ylabel("held-out error rate (WER)")
    ax.set_title("Loopscribe: held-out error vs corrections")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gate_agreement(curves: list[Curve]) -> dict:
    """How often the product's gate (on the project's annotated held-out tasks) takes the decision the same rule
    takes on the large independent held-out set: promote or not."""
    pairs = [(d, i, n) for c in curves for d, i, n in zip(c.decisions, c.independent, c.gate_items)
             if d != "no training data"]
    evidence = [pair for c in curves for pair in c.evidence]
    power = [p for c in curves for p in c.gate_power if p is not None]
    return {
        "held_out_evidence_alone": {  # the general-speech check left out on both sides
            "decisions": len(evidence), "agree": sum((d == "promoted") == (i == "promoted") for d, i in evidence),
            "missed": sum(d != "promoted" and i == "promoted" for d, i in evidence),
            "promoted_but_not_better": sum(d == "promoted" and i == "rejected" for d, i in evidence)},
        "decisions": len(pairs),
        "agree": sum((d == "promoted") == (i == "promoted") for d, i, _ in pairs),
        "promoted_but_not_better": sum(d == "promoted" and i == "rejected" for d, i, _ in pairs),
        "missed": sum(d != "promoted" and i == "promoted" for d, i, _ in pairs),
        "median_items": float(np.median([n for _, _, n in pairs])) if pairs else 0.0,
        "pairs": [f"{d} / {i}" for d, i, _ in pairs],
        "mean_power": float(np.mean(power)) if power else None,
    }


def paired_difference(curves: list[Curve], ranked: str) -> list[tuple[int, list[float], list[float]]]:
    """Per round, ``ranked`` minus ``random`` on the same seed (same pool, same held-out set): mean and 95 % interval
    of the live models' and the candidates' error. Pairing removes how hard each seed's speakers are, which
    dominates the intervals of the plain means."""
    random_runs = {c.seed: c for c in curves if c.strategy == "random"}
    pairs = [(c, random_runs[c.seed]) for c in curves if c.strategy == ranked and c.seed in random_runs]
    if not pairs:
        return []
    rounds = min(min(len(a.points), len(b.points)) for a, b in pairs)
    rows: list[tuple[int, list[float], list[float]]] = []
    for i in range(1, rounds):
        live = list(mean_interval([a.points[i][1] - b.points[i][1] for a, b in pairs]))
        cand = list(mean_interval([a.candidates[i - 1] - b.candidates[i - 1] for a, b in pairs]))
        rows.append((pairs[0][0].points[i][0], live, cand))
    return rows


def summarize(curves: list[Curve], seeds: list[int], corpus: Path | None, force_language: str | None,
              general_margin: float = 0.0) -> dict:
    """Print the table (mean and 95 % interval per round), the gate's outcomes, the label saving, the
    relative drops, forgetting on general speech (``general_margin``: the gate's REGRESSION_MAX_INCREASE) and
    wrong-language predictions; return them for ``loop.json``."""
    strategies = list(dict.fromkeys(c.strategy for c in curves))
    means = {s: mean_curve([c for c in curves if c.strategy == s]) for s in strategies}
    print(f"\nheld-out error: mean over {len(seeds)} seed(s) [95 % interval]; live model (behind the gate), "
          f"then each round's candidate\n{'corrections':>11s} "
          + " ".join(f"{s + ' live':>24s} {s + ' candidate':>24s}" for s in strategies))
    rounds = min(len(c.points) for c in curves)
    for i in range(rounds):
        cells = []
        for s in strategies:
            runs = [c for c in curves if c.strategy == s]
            m, lo, hi = mean_interval([c.points[i][1] for c in runs])
            cells.append(f"{m:7.3f} [{lo:.3f}, {hi:.3f}]")
            if i:
                m, lo, hi = mean_interval([c.candidates[i - 1] for c in runs])
                cells.append(f"{m:7.3f} [{lo:.3f}, {hi:.3f}]")
            else:
                cells.append("")
        print(f"{curves[0].points[i][0]:>11} " + " ".join(f"{c:>24s}" for c in cells))
    outcomes = {s: [d for c in curves if c.strategy == s for d in c.decisions] for s in strategies}
    print("gate outcomes: " + "; ".join(f"{s}: " + ", ".join(f"{n} {o}" for o, n in Counter(outcomes[s]).items())
                                        for s in strategies))
    retried = sum(sum(c.retried) for c in curves)
    if retried:
        print(f"the gate tried {retried} of {sum(len(c.retried) for c in curves)} candidates shrunk for general "
              f"speech (REGRESSION_RETRY_STRENGTH); {sum(st < 1 for c in curves for st in c.strengths)} went live")
        for c in curves:
            for r in c.shrunk:
                speech = (f"; general speech: live {r.general[0]:.3f}, shrunk {r.general[1]:.3f}"
                          if r.general else "")
                speech += f", as trained {r.general_as_trained:.3f}" if r.general_as_trained is not None else ""
                print(f"  {c.strategy} seed {c.seed} round {r.round}: large set {r.error:.3f} at strength "
                      f"{r.strength:g}, {r.error_as_trained:.3f} as trained{speech}")
    summary: dict = {"seeds": seeds, "corpus": str(corpus) if corpus else None,
                     "curves": [asdict(c) for c in curves], "mean": {s: asdict(c) for s, c in means.items()},
                     "gate_agreement": gate_agreement(curves)}
    agreement = summary["gate_agreement"]
    if agreement["decisions"]:
        print(f"the product's gate (median {agreement['median_items']:.0f} held-out tasks) vs the same rule on the "
              f"large held-out set: {agreement['agree']}/{agreement['decisions']} agree; "
              f"{agreement['promoted_but_not_better']} promoted a candidate the large set does not find better, "
              f"{agreement['missed']} missed one it promotes")
        if agreement["mean_power"] is not None:
            print("  a gate of as many utterances drawn from the large set promotes the candidates in "
                  f"{agreement['mean_power']:.0%} of draws on average (its power for differences of these sizes)")
        alone = agreement["held_out_evidence_alone"]
        if alone["decisions"]:
            print(f"  on held-out evidence alone (no general-speech check): {alone['agree']}/{alone['decisions']} "
                  f"agree, {alone['promoted_but_not_better']} promoted but not better, {alone['missed']} missed")
    if "random" in means and means.keys() - {"random"}:
        rnd = means["random"]
        random_final, used = rnd.points[-1][1], rnd.points[-1][0]
        summary |= {"random_final_error": random_final, "random_corrections": used}
        measurable = random_final < rnd.points[0][1]
        if not measurable:
            print(f"\nlabel saving: not measurable: random's live model never improved on {random_final:.3f}")
        for ranked in [s for s in strategies if s != "random"]:
            needed = means[ranked].corrections_to_reach(random_final) if measurable else None
            if measurable:
                print(f"\nlabel saving: random's mean reaches {random_final:.3f} after {used} corrections; {ranked}'s "
                      + (f"after {needed:.0f} ({needed / used:.0%} of random's)" if needed is not None else "does not"))
            summary[f"{ranked}_corrections_to_match"] = needed
            summary.setdefault("paired_difference", {})[ranked] = paired_difference(curves, ranked)
            print(f"{ranked} − random on the same seed's pool and held-out set, mean [95 % interval] per round: "
                  + "; ".join(f"{n}: live {live[0]:+.3f} [{live[1]:+.3f}, {live[2]:+.3f}], "
                              f"candidate {cand[0]:+.3f} [{cand[1]:+.3f}, {cand[2]:+.3f}]"
                              for n, live, cand in summary["paired_difference"][ranked]))
    for s in strategies:
        runs = [c for c in curves if c.strategy == s]
        served = mean_relative_drop([(c.points[0][1], c.points[-1][1]) for c in runs])
        m, lo, hi = served or (float("nan"),) * 3  # no run had a first reading above 0
        line = f"{s}: relative drop as served {m:.1%} [{lo:.1%}, {hi:.1%}]"
        forced = mean_relative_drop([c.forced for c in runs if c.forced])
        if forced:
            line += f"; with the language forced ({force_language}) {forced[0]:.1%} [{forced[1]:.1%}, {forced[2]:.1%}]"
            summary.setdefault("forced_relative_drop", {})[s] = list(forced)
        greedy = mean_relative_drop([c.forced_greedy for c in runs if c.forced_greedy])
        if greedy:  # the same without the fallback's sampled attempts, which move each reading a little
            line += f" (greedy, no fallback draws: {greedy[0]:.1%} [{greedy[1]:.1%}, {greedy[2]:.1%}])"
            summary.setdefault("forced_greedy_relative_drop", {})[s] = list(greedy)
        last = mean_relative_drop([(c.forced[0], c.candidates_forced[-1]) for c in runs
                                   if c.forced and c.candidates_forced])
        if last:  # what the last round's training learned, whatever the gate made of it
            line += f"; last candidate, language forced {last[0]:.1%} [{last[1]:.1%}, {last[2]:.1%}]"
            summary.setdefault("last_candidate_forced_relative_drop", {})[s] = list(last)
        general = [c.general[-1][1] - c.general[0][0] for c in runs if c.general]
        if general:  # forgetting: the last candidate against the base on the regression set, in points
            gm, glo, ghi = mean_interval(general)
            over = sum(lc - ll > general_margin for c in runs for ll, lc in c.general)
            line += (f"; general speech (base {np.mean([c.general[0][0] for c in runs if c.general]):.3f}): last "
                     f"candidate {gm:+.3f} [{glo:+.3f}, {ghi:+.3f}], {over} of {sum(len(c.general) for c in runs)} "
                     f"candidates more than {general_margin} worse than the live model")
            summary.setdefault("general_speech_change", {})[s] = [gm, glo, ghi]
        wrong = [(c.wrong_language[0], c.wrong_language[-1]) for c in runs if len(c.wrong_language) > 1]
        if wrong:
            line += (f"; heard in another language: {sum(w for w, _ in wrong)} → {sum(w for _, w in wrong)} "
                     "held-out utterances (base → last candidate, all seeds)")
        summary.setdefault("relative_drop", {})[s] = [m, lo, hi]
        print(line + f"; {sum(c.seconds for c in runs) / 60:.1f} min")
    return summary


def bench_loop(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.engine import WhisperEngine
    from training.dataset import Example

    from .. import labelstudio, stack

    ls = labelstudio.client(settings)
    settings = with_regression_set(settings)
    base_engine = WhisperEngine(settings, install_missing=True)
    media = stack.StackPaths(settings.home).media
    seeds = list(range(args.seed, args.seed + (args.seeds or (3 if args.corpus else 1))))
    if args.rounds is None:
        args.rounds = 2 if args.corpus else 4
    if args.k is None:  # real speech: the product's first job (RETRAIN_THRESHOLD), past the gate sample served first
        args.k = 50 if args.corpus else 8
    if args.corpus:
        from .corpus import load_corpus

        languages = sorted({lang for _, _, lang in load_corpus(args.corpus)[0]})
        if args.force_language is None and len(languages) == 1:
            args.force_language = languages[0]
        if args.languages is None:  # a project for this corpus lists its languages, as a user's would
            args.languages = languages
    args.languages = [c for c in (args.languages or []) if c != "any"]
    curves: list[Curve] = []
    for seed in seeds:
        if args.corpus:
            pool, heldout = corpus_split(args.corpus, seed, args.pool, args.heldout)
            source = f"{args.corpus.name}: speaker-disjoint"
        else:
            pool, heldout = loop_pool(settings.home / "cache" / "loop", args.pool_domain, args.heldout_domain)
            source = f"synthetic, {args.pool_domain} pool clips with invented names"
        heldout_examples = [Example(-(i + 1), load(c.path), c.text, c.language) for i, c in enumerate(heldout)]
        print(f"seed {seed}: pool {len(pool)} clips, held-out {len(heldout)} clips ({source}); {args.rounds} rounds "
              f"of k={args.k}; LoRA r={settings.lora_r} lr={settings.train_learning_rate} "
              f"epochs={settings.train_epochs} max steps={settings.train_max_steps or 'none'} "
              f"on {','.join(settings.lora_target_modules)} "
              f"encoder={settings.lora_encoder} encoder layers={settings.lora_encoder_layers or 'all'}", flush=True)
        curves += [run_strategy(s, args, settings, ls, base_engine, pool, heldout_examples, media, seed)
                   for s in args.strategy or STRATEGIES]

    summary = summarize(curves, seeds, args.corpus, args.force_language, settings.regression_max_increase)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "loop.png")
    from training.lora import LoraArguments

    # what was trained, beside what it gave
    summary["recipe"] = LoraArguments.from_settings(settings).to_dict() | {"warm_start": settings.train_warm_start}
    (out / "loop.json").write_text(json.dumps(summary, indent=1))
    print(f"\nplot: {out / 'loop.png'}   data: {out / 'loop.json'}")
    return 0
