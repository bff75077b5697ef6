"""Which model is live for which project, decided here and nowhere else, and the engines that serve them.

:func:`live_model` is the one answer to "what serves project N now": ``WHISPER_MODEL`` (resolved by
:func:`~ml_backend.model_store.resolve_base`, which knows nothing of the registry), the adapter the
registry chose for that project (its own lineage, else the global one; see
:meth:`~ml_backend.registry.Registry.choose`), and the name predictions carry (``-int8`` when
``WHISPER_QUANTIZE`` applies). The backend, the worker, the CLI, the training pipeline and the
benchmarks all ask it.

Serving (the backend) and the worker each hold one :class:`LiveEngine`. With ``SERVE_ADAPTERS=shared``
(the default) it keeps one base model and loads each live project's LoRA adapter beside it
(:meth:`~ml_backend.engine.WhisperEngine.with_adapter`): a few MiB per project instead of a whole
model, for a few per cent of the decoding speed (``loopscribe bench adapters`` on 2 CPU cores: 10 live
adapters cost +292 MiB shared against +3042 MiB merged, at 0.96x the merged speed, same transcripts). With
``merged`` (and always when quantized) each live version is its own merged model. Whole models are
pooled by version, at most ``LIVE_MODELS_MAX``, least recently used out first. Each use checks the
registry's pointers (small file reads); when a project's pointer names another version, that
version is loaded next to the old one and swapped in under a lock, so requests in flight finish on
the old model and no request ever sees a half-loaded one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

from .model_store import ResolvedModel, resolve_base
from .registry import Registry
from .settings import Settings
from .transcription import Transcriber

log = logging.getLogger(__name__)


def served_version(version: str, quantized: bool) -> str:
    """A model version as predictions name it: ``-int8`` marks a dynamically quantized model."""
    return version + ("-int8" if quantized else "")


@dataclass(frozen=True)
class LiveModel:
    resolved: ResolvedModel  # the base, with the live adapter when one is promoted
    quantized: bool
    scope: str = "base"  # whose pointer chose it: project-N, global, or base

    @property
    def version(self) -> str:
        """The ``model_version`` predictions, ``/setup`` and the project carry."""
        return served_version(self.resolved.version, self.quantized)

    @property
    def registry_version(self) -> str:
        """The registry's name for it (no ``-int8``): what ``models promote/rollback`` take."""
        return self.resolved.version

    @property
    def base_version(self) -> str:
        return self.resolved.root_version


def live_model(settings: Settings, project: int | None = None, *, install_missing: bool = False) -> LiveModel:
    """What serves ``project`` now (the global lineage or the base when None), without loading anything."""
    from .whisper import quantizes

    base = resolve_base(settings, install_missing=install_missing)
    registry = Registry.open(settings)
    choice = registry.choose(base.version, project)
    live = choice.version
    resolved = base if live is None else replace(base, version=live.version,
                                                  adapter=str(registry.adapter_path(live.version)),
                                                  base_version=base.version)
    return LiveModel(resolved, quantizes(settings), choice.scope)


class LiveEngine:
    """The engines serving every project, loaded on first use and hot-swapped after promotions."""

    def __init__(self, settings: Settings, engine: Transcriber | None = None,
                 factory: Callable[[Settings, LiveModel], Transcriber] | None = None):
        self.settings = settings
        self._pinned = engine  # an engine handed in (tests) serves every project as is
        self._factory = factory
        self._engines: OrderedDict[str, Transcriber] = OrderedDict()  # by served version, most recent last
        self._projects: OrderedDict[int | None, None] = OrderedDict()  # recently served, for watch()
        self._swap_lock = threading.Lock()  # guards the two dicts; held for microseconds
        self._load_lock = threading.Lock()  # one model loads at a time (memory), others keep serving

    def version(self, project: int | None = None) -> str:
        """The version that serves (or is about to serve) ``project``, without loading anything."""
        if self._pinned is not None:
            return self._pinned.model_version
        return live_model(self.settings, project).version

    def served_version(self, version: str) -> str:
        """How predictions name registry version ``version`` when this engine serves it."""
        if self._pinned is not None:
            return served_version(version, getattr(self._pinned, "quantized", False))
        return served_version(version, live_model(self.settings).quantized)

    def loaded(self) -> list[str]:
        """The versions in memory now, least recently used first."""
        return list(self._engines)

    def get(self, project: int | None = None) -> Transcriber:
        """The engine for ``project``'s live version, loading it first when needed."""
        if self._pinned is not None:
            return self._pinned
        live = live_model(self.settings, project)
        with self._swap_lock:
            self._projects[project] = None
            self._projects.move_to_end(project)
            while len(self._projects) > 64:
                self._projects.popitem(last=False)
        if live.resolved.adapter and not live.quantized and self.settings.serve_adapters == "shared":
            base = LiveModel(replace(live.resolved, version=live.base_version, adapter=None, base_version=None),
                             False, live.scope)
            shared = self._model(base)
            with_adapter = getattr(shared, "with_adapter", None)  # a WhisperEngine; stand-ins merge
            if with_adapter is not None:
                return with_adapter(live.version, live.resolved.adapter)
        return self._model(live)

    def _model(self, live: LiveModel) -> Transcriber:
        """The whole model for ``live`` from the pool, loaded first when needed."""
        with self._swap_lock:
            engine = self._engines.get(live.version)
            if engine is not None:
                self._engines.move_to_end(live.version)
                return engine
        with self._load_lock:  # outside the swap lock: loaded models keep serving meanwhile
            with self._swap_lock:
                engine = self._engines.get(live.version)
            if engine is not None:  # another request loaded it while this one waited
                return engine
            engine = self._load(live)
        with self._swap_lock:
            self._engines[live.version] = engine
            limit = max(1, self.settings.live_models_max)
            while len(self._engines) > limit:
                evicted, _ = self._engines.popitem(last=False)
                log.info("unloaded model %s (LIVE_MODELS_MAX=%d)", evicted, limit)
        log.info("loaded %s", live.version)
        return engine

    def _load(self, live: LiveModel) -> Transcriber:
        if self._factory is not None:
            return self._factory(self.settings, live)
        from .engine import WhisperEngine

        return WhisperEngine(self.settings, resolved=live.resolved)

    def watch(self, interval: float = 2.0) -> threading.Thread:
        """Poll the registry in the background, so a promotion is loaded before the next request needs it
        (for the projects served lately)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                for project in list(self._projects)[-max(1, self.settings.live_models_max):]:
                    try:
                        self.get(project)
                    except Exception:  # keep serving the old model; the next poll tries again
                        log.exception("could not load the live model version for project %s", project)

        thread = threading.Thread(target=loop, name="live-model-watch", daemon=True)
        thread.stop = stop  # type: ignore[attr-defined]
        thread.start()
        return thread
