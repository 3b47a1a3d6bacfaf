"""Alembic environment and revisions, shipped inside the package so `qfedit db upgrade` works installed."""
