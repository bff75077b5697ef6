"""``loopscribe bench loop``: does entropy ranking plus LoRA beat random selection?

A simulation of annotators on the real code path, with Label Studio in the loop (needs
``loopscribe up``). For each strategy a scratch project gets the same pool of clips with
ground truth, pre-annotated by the base model; then, round after round:

1. ``k`` tasks are chosen: ``entropy`` takes what Label Studio's ``/next`` serves (uncertainty
   sampling over the live model's confidence, the product's ranking); ``random`` draws from
   the unlabeled tasks with a fixed seed;
2. each is "annotated" with its ground truth through Label Studio's API (as an annotator
   correcting the prediction would);
3. a LoRA adapter is trained on every annotation so far (the retraining job's recipe) and
   evaluated on a frozen held-out set (clips never in the pool); it goes live only through
   the product's gate (better by ``PROMOTE_MIN_GAIN``), and for ``entropy`` a promotion
   re-scores the unlabeled tasks so the next ``/next`` ranks by the new model.

The curve is the held-out error of the live model, as ``loopscribe status`` would show it;
each candidate's own error is kept beside it (``loop.json``). The gate and the curve use
the same held-out set, so the live curve never rises: it is the product's view, and
optimistic in the way any gated deployment is.

The pool (:func:`loop_pool`) mixes sentences around invented product names, in varied
conditions, with speech base Whisper already gets right and a few hopeless clips.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import requests

from ml_backend.settings import Settings

from ..demo import ReferenceClip, load, shared_clips
from ..paths import LABEL_CONFIG
from .synth import TEMPLATES, domain_clips, template_of
from .uncertainty import hard_variants

STRATEGIES = ("entropy", "random")


@dataclass
class Curve:
    strategy: str
    points: list[tuple[int, float]] = field(default_factory=list)  # (corrections, held-out error of the live model)
    candidates: list[float] = field(default_factory=list)  # held-out error of each round's candidate, gated or not
    seconds: float = 0.0

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


def run_strategy(strategy: str, args: argparse.Namespace, settings: Settings, ls, base_engine,
                 pool: list[ReferenceClip], heldout_examples, media: Path) -> Curve:
    from ml_backend.engine import WhisperEngine
    from ml_backend.model_store import resolve_base
    from training.dataset import Example
    from training.evaluate import evaluate
    from training.lora import LoraArguments, train_lora

    from .. import labelstudio

    started = time.perf_counter()
    truth = {c.path.name: c for c in pool}
    config = LABEL_CONFIG.read_text()
    project = labelstudio.create_project(ls, f"bench loop {strategy} {time.strftime('%H%M%S')}", config)
    curve = Curve(strategy)
    work = Path(tempfile.mkdtemp(prefix="bench-loop-", dir=settings.home))
    rng = random.Random(args.seed)
    try:
        labelstudio.import_audio(ls, settings, project, [c.path for c in pool], media_root=media, progress=False)
        labelstudio.predict_project(ls, settings, project, base_engine, progress=False)  # content-hash cache: fast
        live_error = evaluate(base_engine, heldout_examples).error_rate
        curve.points.append((0, live_error))
        print(f"  {strategy:8s} round 0: {0:4d} corrections, held-out error {live_error:.3f}", flush=True)
        annotated: list[Example] = []
        unlabeled = sorted(t.id for t in ls.tasks.list(project=project, fields="task_only"))
        base = resolve_base(settings)
        for round_ in range(1, args.rounds + 1):
            chosen: list[ReferenceClip] = []
            for _ in range(args.k):
                if strategy == "entropy":
                    picked = _next_task(settings, project)
                else:
                    picked = rng.choice(unlabeled) if unlabeled else None
                if picked is None:
                    break
                unlabeled.remove(picked)
                task = ls.tasks.get(id=picked)
                clip = truth[Path(task.data["source_file"]).name]
                labelstudio.submit_transcript(ls, task, clip.text)
                annotated.append(Example(task.id, load(clip.path), clip.text, clip.language))
                chosen.append(clip)
            args_ = LoraArguments.from_settings(settings)
            result = train_lora(base.path, annotated, args_, work / f"{round_}", progress=False)
            candidate = replace(base, version=f"{base.version}-bench-{strategy}-{round_}",
                                adapter=str(result.adapter_dir), base_version=base.version)
            engine = WhisperEngine(settings, resolved=candidate)
            error = evaluate(engine, heldout_examples).error_rate
            promoted = error <= live_error - settings.promote_min_gain  # the product's WER gate
            curve.candidates.append(error)
            if promoted:
                live_error = error
            curve.points.append((len(annotated), live_error))
            vocab_share = sum(c.path.name.startswith("domain_") for c in chosen)
            print(f"  {strategy:8s} round {round_}: {len(annotated):4d} corrections, candidate {error:.3f} "
                  f"{'promoted' if promoted else 'rejected'}, live {live_error:.3f} ({vocab_share}/{len(chosen)} "
                  f"picks had invented names; {result.steps} steps {result.seconds:.0f} s)", flush=True)
            if promoted and strategy == "entropy" and round_ < args.rounds:  # re-scored after a promotion only
                labelstudio.predict_project(ls, settings, project, engine, only_unlabeled=True, progress=False)
            del engine
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            ls.projects.delete(id=project)
    curve.seconds = time.perf_counter() - started
    return curve


def plot(curves: list[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        line, = ax.plot([n for n, _ in c.points], [e for _, e in c.points], marker="o", label=f"{c.strategy} (live)")
        ax.plot([n for n, _ in c.points[1:]], c.candidates, linestyle="--", marker="x", alpha=0.6,
                color=line.get_color(), label=f"{c.strategy} (candidate)")
    ax.set_xlabel("corrections")
    ax.set_ylabel("held-out error rate (WER)")
    ax.set_title("Loopscribe: held-out error vs corrections")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_loop(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.engine import WhisperEngine
    from training.dataset import Example

    from .. import labelstudio, stack

    ls = labelstudio.client(settings)
    pool, heldout = loop_pool(settings.home / "cache" / "loop", args.pool_domain, args.heldout_domain)
    heldout_examples = [Example(-(i + 1), load(c.path), c.text, c.language) for i, c in enumerate(heldout)]
    print(f"pool {len(pool)} clips ({args.pool_domain} with invented names), held-out {len(heldout)} clips; "
          f"{args.rounds} rounds of k={args.k}; LoRA r={settings.lora_r} lr={settings.train_learning_rate} "
          f"epochs={settings.train_epochs}", flush=True)
    base_engine = WhisperEngine(settings, install_missing=True)
    media = stack.StackPaths(settings.home).media
    curves = [run_strategy(s, args, settings, ls, base_engine, pool, heldout_examples, media)
              for s in args.strategy or STRATEGIES]

    print(f"\nheld-out error of the live model (candidate's own in brackets)\n{'corrections':>11s} "
          + " ".join(f"{c.strategy:>17s}" for c in curves))
    for i in range(max(len(c.points) for c in curves)):
        n = curves[0].points[i][0] if i < len(curves[0].points) else ""
        cells = []
        for c in curves:
            if i >= len(c.points):
                cells.append(f"{'':17s}")
            else:
                own = f"({c.candidates[i - 1]:.3f})" if i else ""
                cells.append(f"{c.points[i][1]:9.3f} {own:>7s}")
        print(f"{n:>11} " + " ".join(cells))
    summary: dict = {"curves": [asdict(c) for c in curves]}
    by_name = {c.strategy: c for c in curves}
    if {"entropy", "random"} <= by_name.keys():
        ent, rnd = by_name["entropy"], by_name["random"]
        base_error, random_final = rnd.points[0][1], rnd.points[-1][1]
        needed = ent.corrections_to_reach(random_final)
        used = rnd.points[-1][0]
        summary |= {"random_final_error": random_final, "entropy_corrections_to_match": needed,
                    "random_corrections": used}
        print(f"\nrandom reaches {random_final:.3f} after {used} corrections; entropy reaches it after "
              + (f"{needed:.0f} ({needed / used:.0%} of random's)" if needed is not None else "— (not reached)"))
        for c in (ent, rnd):
            final = c.points[-1][1]
            rel = (base_error - final) / base_error if base_error else float("nan")
            print(f"{c.strategy}: held-out error {base_error:.3f} → {final:.3f} ({rel:.0%} relative) after "
                  f"{c.points[-1][0]} corrections, {c.seconds / 60:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "loop.png")
    (out / "loop.json").write_text(json.dumps(summary, indent=1))
    print(f"\nplot: {out / 'loop.png'}   data: {out / 'loop.json'}")
    return 0
