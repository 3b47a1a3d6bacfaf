"""Alembic environment and revisions.

The wheel ships this folder as the package `qfedit.migrations`, so `qfedit db upgrade` works installed.
"""
