"""Benchmarks: ``loopscribe bench NAME``, one module each, loaded only when asked for.

Product code (the backend, the worker, the stack) never imports this package; the CLI calls
:func:`run`, which imports the one module a benchmark needs.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import replace

from ml_backend.settings import Settings

from ..paths import default_regression_audio

# name → (module in this package, function(args, settings) -> exit code)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": ("engine", "bench_engine"),
    "backend": ("stack", "bench_backend"),
    "retrain": ("stack", "bench_retrain"),
    "export": ("stack", "bench_export"),
    "probe": ("probe", "bench_probe"),
    "train": ("train", "bench_train"),
    "uncertainty": ("uncertainty", "bench_uncertainty"),
    "loop": ("loop", "bench_loop"),
    "recipe": ("recipe", "bench_recipe"),
    "corpus": ("corpus", "bench_corpus"),
    "adapters": ("adapters", "bench_adapters"),
    "words": ("words", "bench_words"),
    "ledger": ("ledger", "bench_ledger"),
}


def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    module, function = BENCHMARKS[name]
    return int(getattr(importlib.import_module(f"{__name__}.{module}"), function)(args, settings))


def with_regression_set(settings: Settings) -> Settings:
    """The settings a benchmark's gate uses: ``REGRESSION_AUDIO`` as set, else the set ``up`` gives the worker."""
    if settings.regression_audio:
        return settings
    return replace(settings, regression_audio=default_regression_audio())
