"""One retraining round: Label Studio export → frozen split → LoRA → held-out WER gate → registry.

Every round trains an adapter on the base model from *all* annotated training data so far
(corrections and verified accepts), so earlier corrections are never forgotten: a fresh one, or
with ``TRAIN_WARM_START`` one that begins as the live model's adapter;
``parent`` records which version was live when it was trained. The candidate goes live
only if it beats the live model on the frozen held-out split by ``PROMOTE_MIN_GAIN``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection

from ml_backend.errors import LoopscribeError
from ml_backend.live import live_model
from ml_backend.model_store import ResolvedModel, resolve_base
from ml_backend.registry import ModelVersion, Registry
from ml_backend.settings import Settings
from ml_backend.splits import HELDOUT
from ml_backend.transcription import TranscribeOptions, Transcriber

from . import distributed, gate
from .dataset import AudioCache, export_annotated, frozen_splits, load_examples
from .evaluate import EvalReport, evaluate
from .lora import LoraArguments, scale_adapter
from .metrics import utterance_counts

if TYPE_CHECKING:
    from ml_backend.engine import WhisperEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    state: str  # promoted | rejected | inconclusive (training.gate)
    version: str | None
    reason: str
    train_size: int
    heldout_size: int
    before: EvalReport | None
    after: EvalReport | None
    seconds: float

    def summary(self) -> str:
        if self.before is None or self.after is None:
            return f"{self.state}: {self.reason}"
        return (f"{self.state} {self.version}: held-out error {self.before.error_rate:.3f} → "
                f"{self.after.error_rate:.3f} on {self.heldout_size} items ({self.reason})")


def _adapter_digest(adapter_dir: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(adapter_dir.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:8]


def gate_options(language_values: Collection[str]) -> TranscribeOptions:
    """How the gate transcribes: as the project is served (its languages only, or the one forced), text only
    (words would cost a decoder pass per window)."""
    return replace(TranscribeOptions.for_project(language_values), word_timestamps=False)


def regression_check(settings: Settings, live: Transcriber, candidate: Transcriber,
                     options: TranscribeOptions | None = None) -> gate.RegressionCheck | None:
    """Both models on the general-speech regression set (``REGRESSION_AUDIO``) in the project's languages, as the
    project is served (``options``, from :func:`gate_options`); None when there is none.

    A project adapter only serves its project: an English project's adapter that now hears French as
    English harms nobody (seen: trained on speechocean762 it did), but one that hears English worse does.
    """
    from ml_backend.audio import AudioDecodeError, decode_audio

    options = options or gate_options(())
    languages = [options.language] if options.language else list(options.languages or ())
    clips, refs, langs = [], [], []
    for path, text, language in gate.regression_clips(settings, languages):
        try:
            clips.append(decode_audio(path, max_seconds=settings.max_audio_seconds, timeout=settings.ffmpeg_timeout))
        except AudioDecodeError as exc:
            log.warning("regression set: skipping %s", exc)
            continue
        refs.append(text)
        langs.append(language)
    if not clips:
        return None
    counts = [utterance_counts(refs, [t.text for t in model.transcribe(clips, options)], langs)
              for model in (live, candidate)]
    return gate.RegressionCheck.from_counts(counts[0], counts[1], settings.regression_max_increase)


@dataclass
class Verdict:
    """The gate's decision on one trained adapter, and the model it was about."""

    decision: gate.Decision
    candidate: ResolvedModel  # as trained, or its adapter shrunk to ``strength``
    engine: WhisperEngine
    before: EvalReport  # the live model on the held-out tasks
    after: EvalReport  # the candidate on them
    strength: float = 1.0  # the adapter's update as trained (1) or scaled by REGRESSION_RETRY_STRENGTH
    full_strength: gate.Decision | None = None  # the decision on the adapter as trained, when it was retried

    @property
    def retried(self) -> bool:
        return self.full_strength is not None


def _held_out_then_general(settings: Settings, live_engine: Transcriber, engine: Transcriber, before: EvalReport,
                           heldout: list, options: TranscribeOptions,
                           on_progress: Callable[..., None]) -> tuple[EvalReport, gate.Decision]:
    after = evaluate(engine, heldout, options)
    comparison = gate.compare(before.counts(), after.counts(), settings.promote_confidence)
    regression = None
    if gate.decide(comparison, settings).outcome == gate.PROMOTE:  # general speech only matters then
        on_progress(stage="checking general speech")
        regression = regression_check(settings, live_engine, engine, options)
    return after, gate.decide(comparison, settings, regression)


def judge(settings: Settings, live_engine: Transcriber, candidate: ResolvedModel, heldout: list,
          options: TranscribeOptions, work: Path, *, on_progress: Callable[..., None] = lambda **_: None) -> Verdict:
    """The promotion gate (:mod:`training.gate`) on ``candidate`` against ``live_engine``, on the held-out tasks.

    A candidate rejected *only* for general speech (better on the project, worse on the regression set) gets one
    more try with its adapter's update scaled by ``REGRESSION_RETRY_STRENGTH``: a shrunk adapter keeps most of
    what the project taught and gives back part of what it cost elsewhere, so the corrections still serve. The
    retry passes the whole gate again (held-out tasks and general speech).
    """
    from ml_backend.engine import WhisperEngine

    on_progress(stage="evaluating live model")
    before = evaluate(live_engine, heldout, options)
    on_progress(stage="evaluating candidate")
    engine = WhisperEngine(settings, resolved=candidate)
    after, decision = _held_out_then_general(settings, live_engine, engine, before, heldout, options, on_progress)
    strength = settings.regression_retry_strength
    only_general = (decision.outcome == gate.REJECT and decision.regression is not None
                    and not decision.regression.passed)
    if not only_general or strength >= 1 or candidate.adapter is None:
        return Verdict(decision, candidate, engine, before, after)
    on_progress(stage=f"trying the adapter at strength {strength:g}")
    shrunk_dir = scale_adapter(Path(candidate.adapter), work / f"adapter-x{strength:g}", strength)
    shrunk = replace(candidate, version=f"{candidate.version}-x{strength:g}", adapter=str(shrunk_dir))
    shrunk_engine = WhisperEngine(settings, resolved=shrunk)
    shrunk_after, retried = _held_out_then_general(settings, live_engine, shrunk_engine, before, heldout, options,
                                                   on_progress)
    log.info("adapter at strength %g: %s (as trained: %s)", strength, retried.outcome, decision.reason)
    if retried.outcome != gate.PROMOTE:  # the adapter as trained is what gets recorded, with both reasons
        both = replace(decision, reason=f"{decision.reason}; at strength {strength:g}: {retried.reason}")
        return Verdict(both, candidate, engine, before, after, full_strength=decision)
    reason = f"at strength {strength:g} (as trained it was {decision.reason}): {retried.reason}"
    return Verdict(replace(retried, reason=reason), shrunk, shrunk_engine, before, shrunk_after, strength, decision)


JOB_OVERRIDES = ("epochs", "max_steps", "learning_rate", "r", "alpha")  # what a job's params may change


def training_arguments(settings: Settings, live_adapter: str | None, params: dict | None = None,
                       **fixed) -> LoraArguments:
    """A job's LoRA arguments: the settings, the job's overrides, and where its adapter begins: with
    ``TRAIN_WARM_START``, as the live model's adapter ``live_adapter`` if it has one (:func:`training.lora.warm_start`).
    """
    params = params or {}
    args = LoraArguments.from_settings(settings, **{k: params[k] for k in JOB_OVERRIDES if k in params}, **fixed)
    if settings.train_warm_start and live_adapter:
        args = replace(args, init_adapter=live_adapter)
    return args


def run_training(
    settings: Settings,
    ls,
    ledger,
    project: int,
    live_engine: Transcriber,  # the model serving ``project`` now
    *,
    params: dict | None = None,
    on_progress: Callable[..., None] = lambda **_: None,
    progress: bool = True,
) -> TrainingOutcome:
    """Train, evaluate and gate one candidate for ``project``; ``live_engine`` is the model serving now."""
    started = time.perf_counter()
    params = dict(params or {})
    registry = Registry.open(settings)

    on_progress(stage="exporting")
    config, annotated = export_annotated(ls, project)
    splits = frozen_splits(ledger, project, [t.task for t in annotated], settings.heldout_fraction)
    examples, failed = load_examples(AudioCache(settings), config, annotated)
    train = [e for e in examples if splits[e.task] != HELDOUT]
    heldout = [e for e in examples if splits[e.task] == HELDOUT]
    log.info("project %s: %d annotated tasks → %d train, %d held out, %d without audio",
             project, len(annotated), len(train), len(heldout), len(failed))
    if not train:
        raise LoopscribeError(f"project {project} has no annotated training tasks ({len(heldout)} held out)")
    if len(heldout) < max(1, settings.heldout_min_items):  # decided before training or evaluation is paid for
        reason = (f"not enough evidence: the held-out split has {len(heldout)} items, fewer than "
                  f"HELDOUT_MIN_ITEMS={settings.heldout_min_items}; nothing was trained or evaluated")
        log.info("project %s: %s", project, reason)
        return TrainingOutcome("rejected", None, reason, len(train), len(heldout), None, None,
                               time.perf_counter() - started)

    base = resolve_base(settings)
    live = live_model(settings, project)  # the gate compares against what serves this project now
    args = training_arguments(settings, live.resolved.adapter, params)
    work = Path(tempfile.mkdtemp(prefix="train-", dir=settings.home))
    try:
        on_progress(stage="training", step=0)
        result = distributed.train(
            base.path, train, args, work / "adapter", processes=distributed.processes_for(settings.train_processes,
                                                                                          settings.device),
            progress=progress, on_step=lambda p: on_progress(stage="training", step=p.step,
                                                             total_steps=p.total_steps, loss=p.loss, eta_s=p.eta_s))
        serial = len(registry.list()) + 1
        version = f"{base.version}-lora{serial:03d}-{_adapter_digest(result.adapter_dir)}"
        candidate = replace(base, version=version, adapter=str(result.adapter_dir), base_version=base.version)

        options = gate_options(config.language_values)  # as the project is served: its languages only
        verdict = judge(settings, live_engine, candidate, heldout, options, work, on_progress=on_progress)
        decision, candidate, before, after = verdict.decision, verdict.candidate, verdict.before, verdict.after
        version, promote, reason = candidate.version, decision.outcome == gate.PROMOTE, decision.reason
        report = {"decision": reason, "outcome": decision.outcome, "gate": decision.to_dict(),
                  "before": before.to_dict(), "after": after.to_dict(), "audio_failed": failed}
        if verdict.full_strength is not None:
            report["full_strength"] = verdict.full_strength.to_dict()

        info = ModelVersion(
            version=version, base_version=base.version, base_model=base.path, parent=live.registry_version,
            project=project, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            train_size=len(train), heldout_size=len(heldout),
            error_before=before.error_rate, error_after=after.error_rate,
            params=args.to_dict() | {"strength": verdict.strength, "steps": result.steps,
                                     "warm_start": live.registry_version if result.warm_started else None,
                                     "final_loss": result.final_loss,
                                     "train_seconds": round(result.seconds, 1), "device": result.device,
                                     "peak_memory_mb": result.peak_memory_mb},
            report=report,
        )
        registry.add(info, Path(candidate.adapter or result.adapter_dir))
        if promote:  # into this project's lineage only: no other project's model changes
            registry.promote(version, base.version)
        else:
            registry.update(version, status=decision.outcome)
        log.info("%s %s: %s", decision.outcome, version, reason)
        return TrainingOutcome(decision.outcome, version, reason, len(train), len(heldout), before, after,
                               time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
