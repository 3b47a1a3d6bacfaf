"""Errors are translated once, by their code: a refusal keeps its HTTP status and names its
field, and a bug is a 500 with an error id that the log repeats, never a 422 "invalid"."""

from __future__ import annotations

import logging

import pytest
from conftest import Broker, auth
from db.helpers import add_model
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api.app import create_app
from qfedit import registry
from qfedit.config import Settings
from qfedit.errors import HTTP_STATUS, ConflictError, ErrorCode


def test_a_bug_is_a_500_with_an_error_id_in_the_log(
    engine: Engine,
    settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise ValueError("an internal inconsistency")  # not a QFEditError: a bug

    monkeypatch.setattr(registry, "list_models", broken)
    app = create_app(settings, enqueue=broker.enqueue, broker_reachable=broker.reachable)
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/models", headers=auth("reader"))
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal" and "an internal inconsistency" not in body["message"]
    logged = [r for r in caplog.records if body["error_id"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, under the id


def test_refusals_keep_the_status_of_their_code(client: TestClient, db: Session) -> None:
    add_model(db)
    db.commit()
    missing = client.get("/v1/models/nope/versions/1", headers=auth("reader"))
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert HTTP_STATUS[ConflictError.code] == 409 and ConflictError.code == ErrorCode.CONFLICT
    writer = auth("writer")
    refused = client.post(
        "/v1/models/tiny/batches", json={"hyperparameters": {"solve": {"lamb": 1}}}, headers=writer
    )
    assert (refused.status_code, refused.json()["error"]) == (422, "invalid")
    assert refused.json()["field"] == "body.hyperparameters.solve.lamb"
