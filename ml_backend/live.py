"""Which model is live, decided here and nowhere else, and the engine that serves it without restarts.

:func:`live_model` is the one answer to "what serves now": ``WHISPER_MODEL`` (resolved by
:func:`~ml_backend.model_store.resolve_base`, which knows nothing of the registry), the registry's
live adapter on top of it if one was promoted for that base, and the name predictions carry
(``-int8`` when ``WHISPER_QUANTIZE`` applies). The backend, the worker, the CLI, the training
pipeline and the benchmarks all ask it.

Serving (the backend) and the worker both hold one :class:`LiveEngine`. Each use checks
the registry's pointer (a small file read); when it names another version the new model
is loaded next to the old one and swapped in under a lock, so requests in flight finish
on the old model and no request ever sees a half-loaded one.
"""

from __future__ import annotations

import logging
import threading
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


def live_model(settings: Settings, *, install_missing: bool = False) -> LiveModel:
    """What serves now, without loading anything."""
    from .whisper import quantizes

    base = resolve_base(settings, install_missing=install_missing)
    registry = Registry(settings.home)
    live = registry.live(base.version)
    resolved = base if live is None else replace(base, version=live.version,
                                                  adapter=str(registry.adapter_path(live.version)),
                                                  base_version=base.version)
    return LiveModel(resolved, quantizes(settings))


class LiveEngine:
    def __init__(self, settings: Settings, engine: Transcriber | None = None,
                 factory: Callable[[Settings], Transcriber] | None = None):
        self.settings = settings
        self._engine = engine
        self._pinned = engine is not None  # an engine handed in (tests) is served as is
        self._factory = factory
        self._swap_lock = threading.Lock()

    @property
    def version(self) -> str:
        """The version that is (or is about to be) served, without loading anything."""
        if self._engine is not None and self._pinned:
            return self._engine.model_version
        return live_model(self.settings).version

    def served_version(self, version: str) -> str:
        """How predictions name registry version ``version`` when this engine serves it."""
        if self._pinned:
            return served_version(version, getattr(self._engine, "quantized", False))
        return served_version(version, live_model(self.settings).quantized)

    def get(self) -> Transcriber:
        """The engine for the live version, loading or swapping it first when needed."""
        if self._engine is not None and self._pinned:
            return self._engine
        wanted = self.version
        current = self._engine
        if current is not None and current.model_version == wanted:
            return current
        with self._swap_lock:
            engine = self._engine
            if engine is None or engine.model_version != wanted:
                previous = engine.model_version if engine is not None else None
                engine = self._engine = self._load()
                if previous:
                    log.info("hot-swapped model %s → %s", previous, engine.model_version)
            return engine

    def _load(self) -> Transcriber:
        if self._factory is not None:
            return self._factory(self.settings)
        from .engine import WhisperEngine

        return WhisperEngine(self.settings, resolved=live_model(self.settings).resolved)

    def watch(self, interval: float = 2.0) -> threading.Thread:
        """Poll the registry in the background, so a promotion is loaded before the next request needs it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.get()
                except Exception:  # keep serving the old model; the next poll tries again
                    log.exception("could not load the live model version")

        thread = threading.Thread(target=loop, name="live-model-watch", daemon=True)
        thread.stop = stop  # type: ignore[attr-defined]
        thread.start()
        return thread
