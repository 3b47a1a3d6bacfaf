"""Alembic environment: runs against a connection handed in by `qfedit.db.migrate`, or a URL.

From the command line (`alembic upgrade head` in the repository root, which reads `alembic.ini`)
the URL is `-x url=...`, else `sqlalchemy.url`, else the settings' (`QFEDIT_DATABASE_URL`, or the
SQLite file in `QFEDIT_DATA_DIR`).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from qfedit.config import get_settings
from qfedit.db import guards  # noqa: F401 - registers the trigger DDL on the metadata
from qfedit.db.engine import make_engine
from qfedit.db.models import Base

config = context.config
target_metadata = Base.metadata

# Only the command line has an ini file; `qfedit.db.migrate` leaves the process's logging alone.
if config.config_file_name is not None and config.file_config.has_section("loggers"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


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
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or get_settings().resolved_database_url
    )
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("qfedit migrations run online only (they install dialect-specific triggers)")
run_migrations_online()
