"""Alembic environment: runs against a connection handed in by `qfedit.db.migrate`, or the settings' URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from qfedit.config import get_settings
from qfedit.db import guards  # noqa: F401 - registers the trigger DDL on the metadata
from qfedit.db.engine import make_engine
from qfedit.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("qfedit migrations run online only (they install dialect-specific triggers)")
run_migrations_online()
