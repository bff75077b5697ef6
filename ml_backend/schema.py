"""The ledger's tables, in one place: what the stores query and what Alembic migrates (``ml_backend/migrations``).

Column types are the portable subset of SQLite and PostgreSQL. A schema change is a new
revision under ``ml_backend/migrations/versions`` plus the matching change here.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

annotations_table = Table(
    "annotations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # Label Studio's annotation id
    Column("project", Integer, nullable=False),
    Column("task", Integer),
    Column("updated_at", Float, nullable=False),  # the annotation's own updated_at (orders events)
    Column("kind", Text, nullable=False),  # correction | verified | cancelled | deleted
    Column("text", Text), Column("language", Text), Column("predicted_text", Text),
    Column("predicted_language", Text),
    Column("model_version", Text),  # of the prediction it started from
    Column("changed_seq", Integer, nullable=False),  # sequence of the last content change
    Index("annotations_project", "project", "kind", "changed_seq"),
)

jobs_table = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", Integer, nullable=False),
    Column("state", Text, nullable=False),  # JobState
    Column("trigger", Text, nullable=False),  # threshold | label-studio | cli | …
    Column("params", Text, nullable=False, server_default="{}"),
    Column("created_at", Float, nullable=False), Column("started_at", Float), Column("finished_at", Float),
    Column("heartbeat_at", Float),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("worker", Text),  # host:pid running it
    Column("cutoff_seq", Integer),  # corrections up to this sequence are covered by this job
    Column("stage", Text), Column("step", Integer), Column("total_steps", Integer), Column("loss", Float),
    Column("eta_s", Float), Column("version", Text), Column("reason", Text),
    Index("jobs_project", "project", "state"),
    sqlite_autoincrement=True,  # ids are never reused, as in the ledgers made before Alembic
)

splits_table = Table(
    "splits", metadata,
    Column("project", Integer, primary_key=True, autoincrement=False),
    Column("task", Integer, primary_key=True, autoincrement=False),
    Column("split", Text, nullable=False),
)

counters_table = Table(
    "counters", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Integer, nullable=False),
)

# ---- the model registry's metadata (adapters stay files: ``$LOOPSCRIBE_HOME/registry/versions/V/adapter``) ----

model_versions_table = Table(
    "model_versions", metadata,
    Column("version", String(200), primary_key=True),
    Column("base_version", Text, nullable=False),
    Column("base_model", Text, nullable=False),  # the path or name the base was resolved from
    Column("parent", Text, nullable=False),  # the version it was trained from
    Column("project", Integer),  # whose corrections trained it (None: no project)
    Column("created_at", Text, nullable=False),
    Column("status", Text, nullable=False),  # candidate | live | rejected | inconclusive | retired
    Column("train_size", Integer, nullable=False), Column("heldout_size", Integer, nullable=False),
    Column("error_before", Float), Column("error_after", Float),
    Column("params", Text, nullable=False),  # JSON
    Column("report", Text, nullable=False),  # JSON: the evaluation report
)

live_pointers_table = Table(
    "live_pointers", metadata,
    Column("scope", String(64), primary_key=True),  # project-N | global
    Column("version", Text, nullable=False),  # the live version (the base version: the base itself)
    Column("base_version", Text, nullable=False),
    Column("since", Float, nullable=False),
)

live_history_table = Table(
    "live_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("scope", Text, nullable=False),
    Column("action", Text, nullable=False),  # promote | rollback
    Column("from_version", Text), Column("to_version", Text, nullable=False),
    Index("live_history_scope", "scope", "id"),
    sqlite_autoincrement=True,
)

# ---- bulk pre-annotation split into shards that any worker takes (``loopscribe predict --queue``) ----

prediction_runs_table = Table(
    "prediction_runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", Integer, nullable=False),
    Column("options", Text, nullable=False),  # JSON: only_missing, only_unlabeled
    Column("tasks", Integer, nullable=False), Column("shards", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),  # set when its last shard ends (done or failed)
    Index("prediction_runs_project", "project", "id"),
    sqlite_autoincrement=True,
)

prediction_shards_table = Table(
    "prediction_shards", metadata,
    Column("run", Integer, primary_key=True, autoincrement=False),
    Column("shard", Integer, primary_key=True, autoincrement=False),
    Column("task_ids", Text, nullable=False),  # JSON list of Label Studio task ids
    Column("state", Text, nullable=False),  # queued | running | done | failed
    Column("worker", Text),  # host:pid running it
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("started_at", Float), Column("heartbeat_at", Float), Column("finished_at", Float),
    Column("predicted", Integer), Column("skipped", Integer), Column("failed", Integer),
    Column("version", Text),  # the model version that pre-annotated it
    Column("reason", Text),
    Index("prediction_shards_state", "state", "run"),
)
