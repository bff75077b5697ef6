"""Bulk pre-annotation runs and their shards, which any worker sharing the database takes.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prediction_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.Integer, nullable=False),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("tasks", sa.Integer, nullable=False), sa.Column("shards", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sqlite_autoincrement=True,
    )
    op.create_index("prediction_runs_project", "prediction_runs", ["project", "id"])
    op.create_table(
        "prediction_shards",
        sa.Column("run", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("shard", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("task_ids", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("worker", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.Float), sa.Column("heartbeat_at", sa.Float), sa.Column("finished_at", sa.Float),
        sa.Column("predicted", sa.Integer), sa.Column("skipped", sa.Integer), sa.Column("failed", sa.Integer),
        sa.Column("version", sa.Text),
        sa.Column("reason", sa.Text),
    )
    op.create_index("prediction_shards_state", "prediction_shards", ["state", "run"])


def downgrade() -> None:
    op.drop_table("prediction_shards")
    op.drop_table("prediction_runs")
