"""The model registry's metadata in the database: versions, live pointers, history.

Before this revision they were files under ``$LOOPSCRIBE_HOME/registry``; the registry
imports those files the first time it opens (:meth:`ml_backend.registry.Registry.import_files`).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(200), primary_key=True),
        sa.Column("base_version", sa.Text, nullable=False),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("parent", sa.Text, nullable=False),
        sa.Column("project", sa.Integer),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("train_size", sa.Integer, nullable=False),
        sa.Column("heldout_size", sa.Integer, nullable=False),
        sa.Column("error_before", sa.Float), sa.Column("error_after", sa.Float),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("report", sa.Text, nullable=False),
    )
    op.create_table(
        "live_pointers",
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("base_version", sa.Text, nullable=False),
        sa.Column("since", sa.Float, nullable=False),
    )
    op.create_table(
        "live_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("from_version", sa.Text), sa.Column("to_version", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("live_history_scope", "live_history", ["scope", "id"])


def downgrade() -> None:
    for table in ("live_history", "live_pointers", "model_versions"):
        op.drop_table(table)
