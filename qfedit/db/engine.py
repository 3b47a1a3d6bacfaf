"""Engines and sessions, created on request (never at import) from a URL or the settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from qfedit.config import Settings


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ignores foreign keys unless asked, per connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets the CLI read while a worker writes; FULL sync makes every commit survive a power
    # loss (NORMAL could roll back the last commits), and imports commit in chunks, so it is cheap.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _create_private(database: Path) -> None:
    """Create an embedded database file readable by its owner only, whatever the umask.

    SQLite would create it with the umask's mode (0644 under the usual 022), readable by every
    local user; its WAL and shared-memory files take the database file's mode. An existing file
    keeps the mode its owner gave it."""
    try:
        descriptor = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(descriptor)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; for a SQLite file its folder is created and foreign keys are enforced."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            _create_private(Path(database))
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(parsed, pool_pre_ping=True, **kwargs)


def engine_from_settings(settings: Settings) -> Engine:
    return make_engine(settings.resolved_database_url)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after a commit (CLI output, chunked imports).
    return sessionmaker(bind=engine, expire_on_commit=False)
