"""Alembic's entry: migrations run on the connection :mod:`ml_backend.database` hands over (its writer lock held)."""

from __future__ import annotations

from alembic import context

from ml_backend.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
