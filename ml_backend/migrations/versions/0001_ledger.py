"""The ledger as it was before Alembic: annotations, jobs, splits, counters.

A ledger made by earlier releases already has these tables (and no ``alembic_version``):
they are kept as they are, so upgrading such a file in place is this revision plus the later ones.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "annotations" not in existing:
        op.create_table(
            "annotations",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("project", sa.Integer, nullable=False),
            sa.Column("task", sa.Integer),
            sa.Column("updated_at", sa.Float, nullable=False),
            sa.Column("kind", sa.Text, nullable=False),
            sa.Column("text", sa.Text), sa.Column("language", sa.Text), sa.Column("predicted_text", sa.Text),
            sa.Column("predicted_language", sa.Text), sa.Column("model_version", sa.Text),
            sa.Column("changed_seq", sa.Integer, nullable=False),
        )
        op.create_index("annotations_project", "annotations", ["project", "kind", "changed_seq"])
    if "jobs" not in existing:
        op.create_table(
            "jobs",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("project", sa.Integer, nullable=False),
            sa.Column("state", sa.Text, nullable=False),
            sa.Column("trigger", sa.Text, nullable=False),
            sa.Column("params", sa.Text, nullable=False, server_default="{}"),
            sa.Column("created_at", sa.Float, nullable=False), sa.Column("started_at", sa.Float),
            sa.Column("finished_at", sa.Float), sa.Column("heartbeat_at", sa.Float),
            sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
            sa.Column("worker", sa.Text), sa.Column("cutoff_seq", sa.Integer),
            sa.Column("stage", sa.Text), sa.Column("step", sa.Integer), sa.Column("total_steps", sa.Integer),
            sa.Column("loss", sa.Float), sa.Column("eta_s", sa.Float), sa.Column("version", sa.Text),
            sa.Column("reason", sa.Text),
            sqlite_autoincrement=True,
        )
        op.create_index("jobs_project", "jobs", ["project", "state"])
    if "splits" not in existing:
        op.create_table(
            "splits",
            sa.Column("project", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("task", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("split", sa.Text, nullable=False),
        )
    if "counters" not in existing:
        op.create_table(
            "counters",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("value", sa.Integer, nullable=False),
        )


def downgrade() -> None:
    for table in ("counters", "splits", "jobs", "annotations"):
        op.drop_table(table)
