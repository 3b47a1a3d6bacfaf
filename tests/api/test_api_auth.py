"""Bearer tokens and scopes: 401 without a valid token, 403 without the scope, and nothing changes."""

from __future__ import annotations

from conftest import Broker, auth
from db.helpers import add_facts, add_model
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qfedit.db import AuditEntry, Batch


def _counts(db: Session) -> tuple[int, int]:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(AuditEntry)) or 0, db.scalar(
        select(func.count()).select_from(Batch)
    ) or 0


def test_health_needs_no_token_and_everything_else_does(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthorized"
    assert response.json()["field"] == "header.Authorization"


def test_wrong_token_and_wrong_scheme_are_401(client: TestClient) -> None:
    assert (
        client.get("/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
    )
    assert client.get("/v1/models", headers={"Authorization": "Basic YTpi"}).status_code == 401
    assert client.get("/v1/models", headers=auth("reader")).status_code == 200


def test_refused_writes_change_nothing(client: TestClient, db: Session, broker: Broker) -> None:
    model = add_model(db)
    add_facts(db, model, 3)
    db.commit()
    before = _counts(db)
    body = b'{"question": "Q?", "answer": "A", "context": "A is the answer."}\n'
    attempts = [
        ({}, 401),
        ({"Authorization": "Bearer not-a-real-token-at-all"}, 401),
        (auth("reader"), 403),
    ]
    for headers, expected in attempts:
        requests = [
            client.post("/v1/models/tiny/batches", json={}, headers={**headers, "Idempotency-Key": "k1"}),
            client.post(
                "/v1/models/tiny/facts/import",
                content=body,
                headers={**headers, "Content-Type": "application/x-ndjson"},
            ),
            client.put(
                "/v1/models/tiny/aliases/staging", json={"version": "0", "reason": "r"}, headers=headers
            ),
            client.post(
                "/v1/models/tiny/facts/retract", json={"fact_ids": [1], "reason": "r"}, headers=headers
            ),
        ]
        assert [r.status_code for r in requests] == [expected] * len(requests)
    assert _counts(db) == before
    assert broker.sent == []


def test_production_needs_admin(client: TestClient, db: Session) -> None:
    add_model(db)
    db.commit()
    move = {"version": "0", "reason": "first release"}
    refused = client.put("/v1/models/tiny/aliases/production", json=move, headers=auth("writer"))
    assert refused.status_code == 403
    assert refused.json()["field"] == "path.name"
    assert client.get("/v1/models/tiny/aliases", headers=auth("reader")).json() == []
    assert client.put("/v1/models/tiny/aliases/staging", json=move, headers=auth("writer")).status_code == 200
    moved = client.put("/v1/models/tiny/aliases/production", json=move, headers=auth("admin"))
    assert moved.status_code == 200, moved.text
    entries = client.get("/v1/audit", params={"action": "alias"}, headers=auth("reader")).json()
    assert [e["actor"] for e in entries] == ["admin", "writer"]


def test_openapi_declares_bearer_auth_on_every_route_but_health(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            secured = any("HTTPBearer" in s for s in operation.get("security", []))
            assert secured == (path not in ("/healthz", "/readyz")), (method, path)
            assert "200" in operation["responses"] or "202" in operation["responses"], (method, path)
