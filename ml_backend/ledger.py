"""The ledger: one database (``$LOOPSCRIBE_HOME/ledger.db`` or ``DATABASE_URL``) holding four stores, each its own job.

* :attr:`Ledger.corrections`: annotation webhooks, idempotent and order-independent
  (:class:`~ml_backend.corrections.CorrectionsStore`);
* :attr:`Ledger.jobs`: the training-job state machine (:class:`~ml_backend.training_jobs.JobStore`);
* :attr:`Ledger.splits`: the frozen held-out split (:class:`~ml_backend.splits.SplitStore`).
* :attr:`Ledger.prediction_runs`: bulk pre-annotation in shards that any worker takes
  (:class:`~ml_backend.prediction_runs.PredictionRunStore`).

They share one database (a training job's cut-off is a position in the corrections' sequence,
taken in the same transaction), but nothing else: each store is its own interface.
"""

from __future__ import annotations

from pathlib import Path

from . import corrections, prediction_runs, splits, training_jobs
from .database import Database


class Ledger:
    def __init__(self, location: str | Path):
        """``location``: a SQLite file, or a database URL (``Settings.ledger_url``: ``DATABASE_URL`` when set)."""
        self.db = Database(location)
        self.corrections = corrections.CorrectionsStore(self.db)
        self.jobs = training_jobs.JobStore(self.db)
        self.splits = splits.SplitStore(self.db)
        self.prediction_runs = prediction_runs.PredictionRunStore(self.db)

    def projects(self) -> list[int]:
        """Projects with corrections or jobs."""
        return sorted(set(self.corrections.projects()) | set(self.jobs.projects()))
