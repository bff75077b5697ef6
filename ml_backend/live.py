"""The live engine: whatever version the registry says is live, swapped in without a restart.

Serving (the backend) and the worker both hold one :class:`LiveEngine`. Each use checks
the registry's pointer (a small file read); when it names another version the new model
is loaded next to the old one and swapped in under a lock, so requests in flight finish
on the old model and no request ever sees a half-loaded one.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .model_store import resolve
from .settings import Settings

log = logging.getLogger(__name__)


class LiveEngine:
    def __init__(self, settings: Settings, engine=None, factory: Callable | None = None):
        self.settings = settings
        self._engine = engine
        self._pinned = engine is not None  # an engine handed in (tests) is served as is
        self._factory = factory
        self._swap_lock = threading.Lock()

    @property
    def version(self) -> str:
        """The version that is (or is about to be) served, without loading anything."""
        if self._pinned:
            return self._engine.model_version
        from .engine import expected_version

        return expected_version(self.settings)

    def served_version(self, version: str) -> str:
        """How predictions name registry version ``version`` when this engine serves it."""
        from .engine import quantizes, served_version

        quantized = getattr(self._engine, "quantized", False) if self._pinned else quantizes(self.settings)
        return served_version(version, quantized)

    def get(self):
        """The engine for the live version, loading or swapping it first when needed."""
        if self._pinned:
            return self._engine
        wanted = self.version
        current = self._engine
        if current is not None and current.model_version == wanted:
            return current
        with self._swap_lock:
            if self._engine is None or self._engine.model_version != wanted:
                previous = self._engine.model_version if self._engine is not None else None
                self._engine = self._load()
                if previous:
                    log.info("hot-swapped model %s → %s", previous, self._engine.model_version)
            return self._engine

    def _load(self):
        if self._factory is not None:
            return self._factory(self.settings)
        from .engine import WhisperEngine

        return WhisperEngine(self.settings, resolved=resolve(self.settings))

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
