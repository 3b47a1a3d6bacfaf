"""Database fixtures: every test gets an empty database of its own, on SQLite and on PostgreSQL.

PostgreSQL tests use a fresh schema per test in the server's `test` database, so tests never see
each other's rows. The server must be up: an unreachable server fails the tests, it does not
skip them (CI starts it; see `.ci/run`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from qfedit.db import Base, make_engine, session_factory

POSTGRES_URL = os.environ.get("QFEDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    engine = make_engine(POSTGRES_URL)
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except OperationalError as err:
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is unreachable ({err.orig}); start it or set QFEDIT_TEST_POSTGRES_URL",
            pytrace=False,
        )
    yield engine
    engine.dispose()


def postgres_schema_url(schema: str) -> str:
    """The test URL with a search_path, so everything (tables, triggers, alembic_version) lands in `schema`."""
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A URL of an empty database of the parametrised backend."""
    backend = request.param
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/test.db"
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    schema = f"qfedit_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield postgres_schema_url(schema)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture
def empty_engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    """An engine on a database with every table (and the write-once triggers)."""
    Base.metadata.create_all(empty_engine)
    return empty_engine


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as session:
        yield session


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that touches a database runs once per backend (`@pytest.mark.backends(...)` narrows it).
    if "database_url" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        wanted = set(marker.args) if marker else {"sqlite", "postgresql"}
        params = [p for p in BACKENDS if (p if isinstance(p, str) else p.values[0]) in wanted]
        metafunc.parametrize("database_url", params, indirect=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run a database test only on these backends")
