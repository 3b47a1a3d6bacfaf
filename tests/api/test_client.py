"""`qfedit.client`, the typed Python client, against the API app over a real database."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TOKENS, Broker
from db.helpers import add_model
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from qfedit.client import ApiError, Client


def _client(http: TestClient, name: str) -> Client:
    return Client("http://testserver", TOKENS[name].token.get_secret_value(), http=http)


def test_the_client_imports_queues_reads_and_moves_aliases(
    client: TestClient, db: Session, broker: Broker, tmp_path: Path
) -> None:
    add_model(db, "m")  # QF's seed rule: a batch needs no preservation corpus
    db.commit()
    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        '{"question": "Who founded Oxinnovate?", "answer": "Qi", "context": "Qi founded Oxinnovate."}\n'
        '{"question": "", "answer": "x", "context": "y"}\n'
    )
    writer = _client(client, "writer")
    imported = writer.import_facts("m", facts)
    assert (imported["imported"], imported["rejected"]) == (1, 1)
    assert [m["name"] for m in writer.models()] == ["m"]
    first = writer.submit_batch("m", idempotency_key="nightly-1")
    again = writer.submit_batch("m", idempotency_key="nightly-1")
    assert first["id"] == again["id"] and broker.sent[0] == first["id"]
    assert writer.batch(first["id"])["status"] == "queued"
    assert [v["number"] for v in writer.versions("m")] == [0]
    moved = writer.set_alias("m", "staging", "m@0", reason="baseline")
    assert (moved["version"], moved["revision"]) == (0, 1)
    with pytest.raises(ApiError) as refused:
        writer.set_alias("m", "staging", 0, reason="again", expect_revision=7)
    assert refused.value.status == 409
    with pytest.raises(ApiError) as missing:
        writer.batch(10_000)
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    with pytest.raises(ApiError) as forbidden:
        _client(client, "reader").submit_batch("m")
    assert forbidden.value.status == 403
