"""One retraining round: Label Studio export → frozen split → LoRA → held-out WER gate → registry.

Every round trains a fresh adapter on the base model from *all* annotated training data
so far (corrections and verified accepts), so earlier corrections are never forgotten;
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
from typing import Callable, Collection

from ml_backend.errors import LoopscribeError
from ml_backend.live import live_model
from ml_backend.model_store import resolve_base
from ml_backend.registry import ModelVersion, Registry
from ml_backend.settings import Settings
from ml_backend.splits import HELDOUT
from ml_backend.transcription import TranscribeOptions, Transcriber

from . import distributed, gate
from .dataset import AudioCache, export_annotated, frozen_splits, load_examples
from .evaluate import EvalReport, evaluate
from .lora import LoraArguments
from .metrics import corpus_error_rate

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
    errors = [corpus_error_rate(refs, [t.text for t in model.transcribe(clips, options)], langs)
              for model in (live, candidate)]
    return gate.RegressionCheck(len(clips), errors[0], errors[1], settings.regression_max_increase)


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
    args = LoraArguments.from_settings(settings, **{k: params[k] for k in ("epochs", "learning_rate", "r", "alpha")
                                                     if k in params})
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

        on_progress(stage="evaluating live model")
        options = gate_options(config.language_values)  # as the project is served: its languages only
        before = evaluate(live_engine, heldout, options)
        on_progress(stage="evaluating candidate")
        from ml_backend.engine import WhisperEngine

        candidate_engine = WhisperEngine(settings, resolved=candidate)
        after = evaluate(candidate_engine, heldout, options)

        comparison = gate.compare(before.counts(), after.counts(), settings.promote_confidence)
        regression = None
        if gate.decide(comparison, settings).outcome == gate.PROMOTE:  # general speech only matters then
            on_progress(stage="checking general speech")
            regression = regression_check(settings, live_engine, candidate_engine, options)
        decision = gate.decide(comparison, settings, regression)
        promote, reason = decision.outcome == gate.PROMOTE, decision.reason

        info = ModelVersion(
            version=version, base_version=base.version, base_model=base.path, parent=live.registry_version,
            project=project, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            train_size=len(train), heldout_size=len(heldout),
            error_before=before.error_rate, error_after=after.error_rate,
            params=args.to_dict() | {"steps": result.steps, "final_loss": result.final_loss,
                                     "train_seconds": round(result.seconds, 1), "device": result.device,
                                     "peak_memory_mb": result.peak_memory_mb},
            report={"decision": reason, "outcome": decision.outcome, "gate": decision.to_dict(),
                    "before": before.to_dict(), "after": after.to_dict(), "audio_failed": failed},
        )
        registry.add(info, result.adapter_dir)
        if promote:  # into this project's lineage only: no other project's model changes
            registry.promote(version, base.version)
        else:
            registry.update(version, status=decision.outcome)
        log.info("%s %s: %s", decision.outcome, version, reason)
        return TrainingOutcome(decision.outcome, version, reason, len(train), len(heldout), before, after,
                               time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
