"""``loopscribe bench recipe``: training recipes compared on the same utterances, without the loop's noise.

``bench loop`` measures the whole product, but two runs of it differ by more than most recipe changes:
every run makes new Label Studio projects, so the hash holds out other tasks, the first round trains on
other utterances and the gate decides on others (one seed's live model after 200 annotations has been
0 % and 34 % better in two runs). This benchmark holds all of that still and runs without the stack.
Per seed it draws the same speaker-disjoint split as ``bench loop --corpus``, takes the ``--train`` pool
utterances the base model is least sure of (what ``/next`` serves after its gate sample), trains one
adapter per recipe on exactly those with the product's training function, and scores every adapter on
the same held-out speakers (language forced, so it is learning, not language fixing) and on the
general-speech regression set. Recipes are compared with the first one per utterance (the gate's paired
bootstrap, pooled over seeds) and per seed. A recipe that changes only the training seed (``seed=…``)
shows how much training randomness alone moves a figure. ``pseudo=N`` (a key of this benchmark, not of
LoRA) adds self-training: the ``N`` pool utterances the base model is surest of, outside the trained ones,
with the base model's own transcripts as targets (what the project's pre-annotations of unannotated tasks
would give).

An ``--out`` folder accumulates: every run is appended to its ``runs.json`` as it ends, with the settings it
changed and the arguments it trained with, and each seed's ranking and base score go to ``base-SEED.json`` (the
base model's transcripts of its pool, which the ranking and ``pseudo=N`` read, to ``pool-SEED.json``).
Run again into the same folder and the recipes already run on a seed are not run again, nor is the base
model's ranking of a seed redone: a stopped benchmark resumes, and a new recipe costs only its own training.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_backend.settings import Settings

from ..demo import load
from . import with_regression_set
from .loop import corpus_split, mean_interval

if TYPE_CHECKING:
    from training.lora import LoraArguments

FIXED = ("device", "dtype", "init_adapter")  # not a recipe's to change: the machine's, or a live model's
BENCH_KEYS: dict[str, int] = {"pseudo": 0}  # recipe keys of this benchmark, not LoraArguments fields


@dataclass(frozen=True)
class Recipe:
    """A name and the :class:`training.lora.LoraArguments` it changes from the settings' own."""

    name: str
    overrides: dict[str, object] = field(default_factory=dict)

    @property
    def pseudo(self) -> int:
        """How many of the base model's surest pool transcripts it adds to the training utterances."""
        return int(self.overrides.get("pseudo", 0))  # type: ignore[call-overload]

    @property
    def lora_overrides(self) -> dict[str, object]:
        return {k: v for k, v in self.overrides.items() if k not in BENCH_KEYS}


def parse_recipe(text: str) -> Recipe:
    """``NAME`` or ``NAME:key=value;key=value`` (LoraArguments fields or :data:`BENCH_KEYS`; lists joined
    with ``+``)."""
    from training.lora import LoraArguments

    name, _, spec = text.partition(":")
    defaults = LoraArguments()
    known = {f.name for f in dataclasses.fields(LoraArguments)} - set(FIXED) | set(BENCH_KEYS)
    overrides: dict[str, object] = {}
    for pair in filter(None, spec.split(";")):
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise argparse.ArgumentTypeError(f"recipe {name!r}: {pair!r} is not key=value with a key of "
                                             f"{', '.join(sorted(known))}")
        current = BENCH_KEYS[key] if key in BENCH_KEYS else getattr(defaults, key)
        try:
            if isinstance(current, bool):
                value: object = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(current, tuple):
                value = tuple(v for v in raw.split("+") if v)
            else:
                value = type(current)(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"recipe {name!r}: {key}={raw!r}: {exc}") from exc
        if key in BENCH_KEYS and int(value) < 0:  # type: ignore[call-overload]
            raise argparse.ArgumentTypeError(f"recipe {name!r}: {key} counts utterances, not {raw!r}")
        overrides[key] = value
    if not re.fullmatch(r"[\w.+-]+", name):  # it names a folder and a table row
        raise argparse.ArgumentTypeError(f"{text!r}: a recipe needs a name of letters, digits and . + - _")
    return Recipe(name, overrides)


@dataclass
class Run:
    """One recipe trained and scored on one seed's utterances."""

    recipe: str
    seed: int
    error: float  # held-out speakers, language forced
    base_error: float
    general: tuple[float, float] | None  # regression set: base, this adapter
    steps: int
    seconds: float
    final_loss: float
    counts: list[tuple[int, int]] = field(repr=False, default_factory=list)  # (errors, words) per utterance
    overrides: dict[str, object] | None = None  # the recipe's changes, as JSON holds them (None: not recorded)
    arguments: dict[str, object] | None = None  # what it trained with: recorded_arguments (None: not recorded)

    @property
    def drop(self) -> float:
        """Relative error drop from the base model (0.25: a quarter fewer errors)."""
        return 1 - self.error / self.base_error if self.base_error else 0.0


def as_json(overrides: dict[str, object]) -> dict[str, object]:
    """A recipe's overrides as they read back from JSON (tuples become lists), so stored ones compare equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def recipe_lora(settings: Settings, recipe: Recipe, seed: int = 0) -> LoraArguments:
    """The LoRA arguments a recipe trains with: the settings' own (``LORA_R``, …) with its overrides."""
    from training.lora import LoraArguments

    overrides: dict[str, Any] = recipe.lora_overrides  # parse_recipe typed each value as its field
    return replace(LoraArguments.from_settings(settings, seed=seed), **overrides)


def recorded_arguments(lora: LoraArguments) -> dict[str, object]:
    """What a run keeps of its :func:`recipe_lora`, as JSON holds it. "default" means whatever the settings say,
    so a run is only the same recipe when these match. The machine's fields and the seed (the run's, unless
    the recipe sets one: that is in its overrides) are left out."""
    return as_json({k: v for k, v in dataclasses.asdict(lora).items() if k not in (*FIXED, "seed")})


def read_runs(path: Path) -> list[Run]:
    """The runs a ``runs.json`` holds; ValueError (with the reason) for anything else."""
    try:
        rows = json.loads(Path(path).read_text())
        return [Run(**{**row, "general": tuple(row["general"]) if row["general"] else None,
                       "counts": [tuple(c) for c in row["counts"]]}) for row in rows]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a runs.json of bench recipe ({exc})") from exc


def already_run(earlier: list[Run], recipes: list[Recipe],
                arguments: dict[str, dict[str, object]] | None = None) -> set[tuple[str, int]]:
    """``(recipe, seed)`` pairs an earlier invocation into the same folder ran; ValueError when one of them ran
    under the same name with other overrides or, where ``arguments`` (name → :func:`recorded_arguments`) and the
    run both say, other resolved arguments, e.g. "default" before ``LORA_R`` changed (its figures would be
    mistaken for this recipe's)."""
    from training.lora import LoraArguments

    wanted = {r.name: as_json(r.overrides) for r in recipes}
    # a run recorded before a field existed trained as that field's default does (a new field keeps the old behaviour
    # as its default), so the field's default stands in for it
    added_since = recorded_arguments(LoraArguments())
    done = set()
    for run in earlier:
        if run.recipe not in wanted:
            continue
        if run.overrides is not None and run.overrides != wanted[run.recipe]:
            raise ValueError(f"recipe {run.recipe!r} already ran in this folder as {run.overrides or 'the default'} "
                             f"(now {wanted[run.recipe] or 'the default'}): rename it or use another --out")
        now = (arguments or {}).get(run.recipe)
        then = None if run.arguments is None else {**added_since, **run.arguments}
        if then is not None and now is not None and then != now:
            changed = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
            raise ValueError(f"recipe {run.recipe!r} already ran in this folder with "
                             + ", ".join(f"{k}={then.get(k)}" for k in changed) + " (now "
                             + ", ".join(f"{k}={now.get(k)}" for k in changed) + "): rename it or use another --out")
        done.add((run.recipe, run.seed))
    return done


def least_confident(transcripts: list[tuple[float, str]], n: int) -> list[int]:
    """Indices of the ``n`` clips the model is least sure of: the order ``/next`` serves them in."""
    return sorted(range(len(transcripts)), key=lambda i: transcripts[i][0])[:n]


def transcribed_pool(cache: Path, key: dict, engine, clips, options) -> list[tuple[float, str]]:
    """Each pool clip's (confidence, transcript) by the base model, kept in ``cache`` for the same ``key``."""
    def transcribe() -> dict:
        hyps = engine.transcribe([load(c.path) for c in clips], options)
        return {"transcripts": [(h.confidence, h.text) for h in hyps]}

    return [(float(c), str(t)) for c, t in base_of_seed(cache, key, transcribe)["transcripts"]]


def surest(transcripts: list[tuple[float, str]], outside: Collection[int], n: int) -> list[int]:
    """Indices of the ``n`` clips with the most confident (non-empty) transcripts, leaving out ``outside``."""
    candidates = (i for i, (_, text) in enumerate(transcripts) if i not in outside and text.strip())
    return sorted(candidates, key=lambda i: -transcripts[i][0])[:n]


def read_kept(cache: Path) -> dict:
    """What :func:`base_of_seed` kept in a seed's cache file (a ranking, a pool's transcripts; {} when nothing
    readable is there)."""
    try:
        kept = json.loads(cache.read_text())
        return kept if isinstance(kept, dict) else {}
    except (OSError, ValueError):
        return {}


def base_of_seed(cache: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """What the base model gives for a seed (its ranking and score, its pool's transcripts), from ``cache`` when
    it was made for the same ``key`` (corpus, sizes, base model, language), else computed and kept there:
    decoding with the base model is the slow part of a seed that no recipe changes."""
    kept = read_kept(cache)
    if kept.get("key") == key:
        return kept
    value = {"key": key, **compute()}
    cache.write_text(json.dumps(value, indent=1))
    return value


def seed_key(args: argparse.Namespace, seed: int, base_version: str, language: str) -> dict:
    """What a seed's ranking, base score and runs depend on: a folder's runs of another key are not these."""
    return {"corpus": str(Path(args.corpus).resolve()), "seed": seed, "pool": args.pool, "heldout": args.heldout,
            "train": args.train, "base": base_version, "language": language}


def base_cache(out: Path, seed: int) -> Path:
    """Where a seed's ranking and base score are kept in an ``--out`` folder."""
    return Path(out) / f"base-{seed}.json"


def run_seed(args: argparse.Namespace, settings: Settings, base_engine, language: str, seed: int, key: dict,
             done: Callable[[Run], None], skip: Collection[str] = ()) -> list[Run]:
    """Train and score every recipe not in ``skip`` (already run into ``args.out``) on one seed's utterances;
    ``key`` (:func:`seed_key`) says which ranking kept in the folder is this seed's."""
    from ml_backend.engine import WhisperEngine
    from ml_backend.model_store import resolve_base
    from ml_backend.transcription import TranscribeOptions
    from training.dataset import Example
    from training.evaluate import evaluate
    from training.lora import train_lora
    from training.pipeline import regression_check

    base = resolve_base(settings)
    recipes = [r for r in args.recipe if r.name not in skip]
    if not recipes:
        print(f"seed {seed}: every recipe already ran in {args.out}", flush=True)
        return []
    pool, heldout = corpus_split(args.corpus, seed, args.pool, args.heldout)
    forced = TranscribeOptions(language=language, word_timestamps=False)
    heldout_examples = [Example(-(i + 1), load(c.path), c.text, c.language) for i, c in enumerate(heldout)]

    def pool_transcripts() -> list[tuple[float, str]]:  # one decode of the pool serves ranking and self-training
        return transcribed_pool(Path(args.out) / f"pool-{seed}.json", key, base_engine, pool, forced)

    def rank_and_score() -> dict:
        picked = least_confident(pool_transcripts(), args.train)
        return {"picked": picked, "error": evaluate(base_engine, heldout_examples, forced).error_rate}

    ranked = base_of_seed(base_cache(args.out, seed), key, rank_and_score)
    train = [Example(i, load(pool[i].path), pool[i].text, pool[i].language) for i in ranked["picked"]]
    base_error = ranked["error"]
    transcripts = pool_transcripts() if any(r.pseudo for r in recipes) else []
    print(f"seed {seed}: {len(train)} least confident of a pool of {len(pool)} to train on, {len(heldout)} "
          f"held-out utterances of other speakers; base {base_error:.3f} ({language} forced)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-recipe-", dir=settings.home))
    runs = []
    try:
        for recipe in recipes:
            lora = recipe_lora(settings, recipe, seed)
            extra = [Example(i, load(pool[i].path), transcripts[i][1], language)
                     for i in surest(transcripts, set(ranked["picked"]), recipe.pseudo)] if recipe.pseudo else []
            result = train_lora(base.path, train + extra, lora, work / recipe.name, progress=False)
            candidate = replace(base, version=f"{base.version}-recipe-{recipe.name}-{seed}",
                                adapter=str(result.adapter_dir), base_version=base.version)
            engine = WhisperEngine(settings, resolved=candidate)
            report = evaluate(engine, heldout_examples, forced)
            general = regression_check(settings, base_engine, engine, forced)
            run = Run(recipe.name, seed, report.error_rate, base_error,
                      (general.live_error, general.candidate_error) if general else None,
                      result.steps, result.seconds, result.final_loss, report.counts(), as_json(recipe.overrides),
                      recorded_arguments(lora))
            runs.append(run)
            done(run)
            print(f"  {recipe.name:14s} {run.error:.3f} ({-run.drop:+.1%})"
                  + (f", general speech {run.general[0]:.3f} → {run.general[1]:.3f}" if run.general else "")
                  + f"; {run.steps} steps in {run.seconds:.0f} s, final loss {run.final_loss:.3f}", flush=True)
            del engine
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def summarize(runs: list[Run], recipes: list[Recipe], confidence: float) -> dict:
    """Per recipe: mean over seeds with a 95 % interval; against the first recipe: paired per seed and per
    utterance (the gate's bootstrap over every seed's held-out utterances together)."""
    from training import gate

    reference = recipes[0].name
    by = {(r.recipe, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    rows = {}
    print(f"\n{'recipe':14s} {'drop (95 % interval over seeds)':34s} {'general speech':16s} "
          f"{'vs ' + reference + ' per seed':24s} per utterance")
    for recipe in recipes:
        mine = [by[recipe.name, s] for s in seeds]
        drop = mean_interval([r.drop for r in mine])
        general = [r.general[1] - r.general[0] for r in mine if r.general]
        paired = mean_interval([by[recipe.name, s].error - by[reference, s].error for s in seeds])
        pooled = gate.compare([c for s in seeds for c in by[reference, s].counts],
                              [c for r in mine for c in r.counts], confidence)
        rows[recipe.name] = {
            "overrides": as_json(recipe.overrides),
            "drop": drop, "drops": [r.drop for r in mine], "errors": [r.error for r in mine],
            "general_change": general, "steps": [r.steps for r in mine], "seconds": [r.seconds for r in mine],
            "final_loss": [r.final_loss for r in mine], "vs_reference": paired,
            "vs_reference_pooled": dataclasses.asdict(pooled),
        }
        general_text = f"{sum(general) / len(general):+.3f}" if general else "—"
        versus = "" if recipe.name == reference else (
            f"{paired[0]:+.3f} [{paired[1]:+.3f}, {paired[2]:+.3f}]   "
            f"{-pooled.gain:+.3f}, p {pooled.p_value:.3f} ({pooled.improved} better, {pooled.worsened} worse)")
        print(f"{recipe.name:14s} {-drop[0]:+.1%} [{-drop[2]:+.1%}, {-drop[1]:+.1%}]{'':10s} "
              f"{general_text:16s} {versus}")
    print("(error differences: recipe − " + reference + ", negative is better; p: the share of bootstrap "
          "resamples in which the recipe is not better)")
    return {"reference": reference, "seeds": seeds, "recipes": rows}


def summarize_runs(paths: list[Path], confidence: float) -> int:
    """The summary over the runs of earlier invocations (``runs.json``; e.g. one seed each, run apart)."""
    runs = []
    for path in paths:
        try:
            runs += read_runs(path)
        except ValueError as exc:
            print(exc)
            return 2
    if not runs:
        print("no runs to summarize")
        return 2
    names = list(dict.fromkeys(r.recipe for r in runs))  # the first recipe run is the reference
    seeds = {r.seed for r in runs}
    complete = [n for n in names if {r.seed for r in runs if r.recipe == n} == seeds]
    if names[0] not in complete:
        print(f"the reference recipe {names[0]!r} lacks seeds: {sorted(seeds)}")
        return 2
    if len(complete) < len(names):
        print(f"left out, not run on every seed: {', '.join(n for n in names if n not in complete)}")
    stored = {r.recipe: r.overrides for r in runs if r.overrides is not None}
    summarize([r for r in runs if r.recipe in complete], [Recipe(n, stored.get(n) or {}) for n in complete],
              confidence)
    return 0


def bench_recipe(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.engine import WhisperEngine
    from ml_backend.model_store import resolve_base

    from .corpus import load_corpus

    settings = with_regression_set(settings)
    if args.runs:
        return summarize_runs(args.runs, settings.promote_confidence)
    if args.corpus is None:
        print("bench recipe needs --corpus (or --runs to summarize earlier runs)")
        return 2
    languages = sorted({lang for _, _, lang in load_corpus(args.corpus)[0]})
    if len(languages) != 1:
        print(f"bench recipe needs a corpus in one language (to force it); {args.corpus} has {languages}")
        return 2
    try:
        recipes = [parse_recipe(text) for text in args.recipe or []]
    except argparse.ArgumentTypeError as exc:
        print(exc)
        return 2
    if not recipes or recipes[0].overrides:
        recipes.insert(0, Recipe("default"))  # the settings' own recipe is the reference
    args.recipe = recipes
    names = [r.name for r in args.recipe]
    if len(set(names)) != len(names):
        print(f"recipe names must differ: {names}")
        return 2
    started = time.perf_counter()
    base_engine = WhisperEngine(settings, install_missing=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(args.seed, args.seed + args.seeds)
    try:  # an earlier invocation into this folder: its runs are kept, and not run again
        runs = read_runs(out / "runs.json") if (out / "runs.json").exists() else []
        arguments = {r.name: recorded_arguments(recipe_lora(settings, r)) for r in args.recipe}
        done = {(name, seed) for name, seed in already_run(runs, args.recipe, arguments) if seed in seeds}
    except ValueError as exc:
        print(exc)
        return 2
    if done:
        print(f"{out}: {len(done)} of these runs already there, not run again", flush=True)

    def keep(run: Run) -> None:  # each run as it ends: a long benchmark stopped early keeps what it measured
        runs.append(run)
        (out / "runs.json").write_text(json.dumps([dataclasses.asdict(r) for r in runs]))

    base_version = resolve_base(settings).version
    keys = {seed: seed_key(args, seed, base_version, languages[0]) for seed in seeds}
    for seed in sorted({s for _, s in done}):
        if read_kept(base_cache(out, seed)).get("key") != keys[seed]:
            print(f"{out} holds runs of seed {seed} made on another corpus, sizes or base model "
                  f"({base_cache(out, seed).name}): use another --out")
            return 2
    for seed in seeds:
        run_seed(args, settings, base_engine, languages[0], seed, keys[seed], keep,
                 {n for n, s in done if s == seed})
    mine = [r for r in runs if r.seed in seeds and r.recipe in names]
    summary = summarize(mine, args.recipe, settings.promote_confidence)
    summary["train"], summary["pool"], summary["heldout"] = args.train, args.pool, args.heldout
    summary["minutes"] = (time.perf_counter() - started) / 60
    (out / "recipe.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{summary['minutes']:.0f} min; data: {out / 'recipe.json'}, every run: {out / 'runs.json'}")
    return 0
