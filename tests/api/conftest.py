"""API fixtures: an app over a real database (SQLite and PostgreSQL, the database tests' fixtures).

Sending to the broker is recorded rather than done (`sent`); the Celery side has its own tests.
Every test gets its own app, engine, data folder and tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from db.conftest import (  # noqa: F401  (fixtures and the per-backend parametrisation, reused)
    database_url,
    empty_engine,
    engine,
    postgres_admin,
    pytest_configure,
    pytest_generate_tests,
    session,
)
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api.app import create_app
from qfedit.config import ApiToken, Settings

TOKENS = {
    "reader": ApiToken(token="read-token-0123456789abcdefghijklmnop", scope="read"),
    "writer": ApiToken(token="write-token-0123456789abcdefghijklmnop", scope="write"),
    "admin": ApiToken(token="admin-token-0123456789abcdefghijklmnop", scope="admin"),
}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name].token.get_secret_value()}"}


class Broker:
    """Stands in for `worker.client`: records what was sent; `up` False makes sending fail."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.up = True

    def enqueue(self, batch_id: int, settings: Settings) -> None:
        if not self.up:
            raise ConnectionError("broker down")
        self.sent.append(batch_id)

    def reachable(self, settings: Settings) -> bool:
        return self.up


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:  # noqa: F811  (uses the imported fixture)
    return Settings(data_dir=tmp_path / "data", database_url=database_url, api_tokens=TOKENS)


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def client(engine: Engine, settings: Settings, broker: Broker) -> Iterator[TestClient]:  # noqa: F811
    # `engine` has created the tables; the app opens its own engine on the same database.
    app = create_app(settings, enqueue=broker.enqueue, broker_reachable=broker.reachable)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def db(session: Session) -> Session:  # noqa: F811
    """A session of the test's own, to set up rows and to check what the API changed."""
    return session
