"""Alembic migrations of the ledger's schema (:mod:`ml_backend.schema`); :mod:`ml_backend.database` runs them."""
