"""Batches: enqueue honouring Idempotency-Key, status and progress, cancel, list, limits, broker down."""

from __future__ import annotations

import pytest
from conftest import Broker, auth
from db.helpers import add_facts, add_model
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.db import Batch, BatchStatus
from qfedit.pipeline import lifecycle


def _batches(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(Batch)) or 0


def test_enqueue_is_idempotent_by_key(client: TestClient, db: Session, broker: Broker) -> None:
    model = add_model(db)
    ids = add_facts(db, model, 4)
    db.commit()
    headers = {**auth("writer"), "Idempotency-Key": "nightly-2026-11-28"}
    first = client.post(
        "/v1/models/tiny/batches", json={"hyperparameters": {"solve": {"lam": 0.5}}}, headers=headers
    )
    assert first.status_code == 202, first.text
    batch = first.json()
    assert (batch["status"], batch["fact_count"], batch["progress"], batch["version"]) == (
        "queued",
        4,
        0.0,
        None,
    )
    assert batch["hyperparameters"] == {"edit": {"solve": {"lam": 0.5}}}
    assert batch["settings"]["edit"]["solve"]["lam"] == 0.5
    assert batch["idempotency_key"] == "nightly-2026-11-28"
    second = client.post(
        "/v1/models/tiny/batches", json={"hyperparameters": {"solve": {"lam": 0.5}}}, headers=headers
    )
    assert second.json()["id"] == batch["id"]
    # Said as a replay: 200 and Idempotent-Replayed, where a new batch is 202 without it.
    assert (second.status_code, second.headers.get("Idempotent-Replayed")) == (200, "true")
    assert "Idempotent-Replayed" not in first.headers
    assert _batches(db) == 1
    assert broker.sent == [batch["id"], batch["id"]]
    # The same key for other facts is refused rather than silently answered with the first batch.
    other = client.post("/v1/models/tiny/batches", json={"fact_ids": ids[:1]}, headers=headers)
    assert (other.status_code, other.json()["error"]) == (409, "conflict")
    assert "idempotency key" in other.json()["message"]
    assert _batches(db) == 1


def test_status_progress_cancel_and_list(client: TestClient, db: Session, broker: Broker) -> None:
    model = add_model(db)
    ids = add_facts(db, model, 3)
    db.commit()
    created = client.post(
        "/v1/models/tiny/batches", json={"fact_ids": ids[:2]}, headers=auth("writer")
    ).json()
    batch = registry.get_batch(db, created["id"])
    lifecycle.transition_batch(db, batch, BatchStatus.CAPTURING, actor="worker", progress=0.25)
    db.commit()
    status = client.get(f"/v1/batches/{created['id']}", headers=auth("reader")).json()
    assert (status["status"], status["progress"], status["attempts"]) == ("capturing", 0.25, 1)
    cancelled = client.post(f"/v1/batches/{created['id']}/cancel", headers=auth("writer"))
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/batches/{created['id']}/cancel", headers=auth("writer"))
    assert again.status_code == 200  # cancelling a cancelled batch is a no-op
    second = client.post("/v1/models/tiny/batches", json={"fact_ids": ids[2:]}, headers=auth("writer")).json()
    listed = client.get("/v1/batches", params={"model": "tiny"}, headers=auth("reader")).json()["items"]
    assert [b["id"] for b in listed] == [second["id"], created["id"]]
    queued = client.get("/v1/batches", params={"status": "queued"}, headers=auth("reader")).json()["items"]
    assert [b["id"] for b in queued] == [second["id"]]
    cancels = client.get(
        "/v1/audit", params={"action": "batch.status", "actor": "writer"}, headers=auth("reader")
    )
    assert [e["details"]["to"] for e in cancels.json()] == ["cancelled"]


def test_refusals_name_the_field(client: TestClient, db: Session, settings: object) -> None:
    model = add_model(db)
    add_facts(db, model, 2)
    db.commit()
    writer = auth("writer")
    cases = [
        ({"fact_ids": [0]}, "body.fact_ids.0"),
        ({"fact_ids": [2**40]}, "body.fact_ids.0"),
        ({"fact_ids": "all"}, "body.fact_ids"),
        ({"surprise": 1}, "body.surprise"),
        ({"fact_ids": [999]}, None),  # not a fact of this model: 404 below
    ]
    for body, field in cases[:-2]:
        response = client.post("/v1/models/tiny/batches", json=body, headers=writer)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["field"] == field
    not_finite = client.post(
        "/v1/models/tiny/batches",
        content=b'{"hyperparameters": {"lambda": NaN}}',
        headers={**writer, "Content-Type": "application/json"},
    )
    assert not_finite.status_code == 422
    assert not_finite.json()["field"].startswith("body.hyperparameters.lambda")
    missing = client.post("/v1/models/tiny/batches", json={"fact_ids": [999]}, headers=writer)
    assert missing.status_code == 404
    bad_key = client.post("/v1/models/tiny/batches", json={}, headers={**writer, "Idempotency-Key": "a b"})
    assert (bad_key.status_code, bad_key.json()["field"]) == (422, "header.Idempotency-Key")
    assert _batches(db) == 0


def test_batch_size_limit(client: TestClient, db: Session) -> None:
    add_model(db)
    db.commit()
    limit = client.app.state.settings.api_max_batch_facts  # type: ignore[attr-defined]
    response = client.post(
        "/v1/models/tiny/batches", json={"fact_ids": list(range(1, limit + 2))}, headers=auth("writer")
    )
    assert response.status_code in (413, 422)
    assert response.json()["field"] in ("body", "body.fact_ids")


def test_nothing_pending_is_a_clear_422(client: TestClient, db: Session) -> None:
    add_model(db)
    db.commit()
    response = client.post("/v1/models/tiny/batches", json={}, headers=auth("writer"))
    assert response.status_code == 422
    assert "no pending facts" in response.json()["message"]


def test_broker_down_keeps_the_batch_and_a_retry_sends_it(
    client: TestClient, db: Session, broker: Broker
) -> None:
    model = add_model(db)
    add_facts(db, model, 2)
    db.commit()
    broker.up = False
    headers = {**auth("writer"), "Idempotency-Key": "retry-me"}
    down = client.post("/v1/models/tiny/batches", json={}, headers=headers)
    assert (down.status_code, down.json()["error"]) == (503, "broker_unavailable")
    assert client.get("/readyz").status_code == 503
    broker.up = True
    retried = client.post("/v1/models/tiny/batches", json={}, headers=headers)
    # The batch the first try kept, now sent: a replay of the key, said so.
    assert (retried.status_code, retried.headers.get("Idempotent-Replayed")) == (200, "true")
    assert broker.sent == [retried.json()["id"]]
    assert _batches(db) == 1


@pytest.mark.parametrize(
    "overrides",
    [
        {"promote": {}},
        {"promote": {"efficacy": 0.0}},
        {"known_facts": "/etc/passwd"},
        {"preservation_corpus": ["/etc/hostname"]},
    ],
)
def test_a_write_token_cannot_release_or_name_files(
    client: TestClient, db: Session, overrides: dict[str, object]
) -> None:
    model = add_model(db)
    add_facts(db, model, 2)
    db.commit()
    response = client.post(
        "/v1/models/tiny/batches", json={"hyperparameters": overrides}, headers=auth("writer")
    )
    assert response.status_code == 422, response.text
    (key,) = overrides
    assert response.json()["field"] == "body.hyperparameters"
    message = response.json()["message"]
    assert f"{key} is a model setting" in message and "root:" not in response.text
    assert _batches(db) == 0
    assert client.get("/v1/models/tiny/aliases", headers=auth("reader")).json() == []
