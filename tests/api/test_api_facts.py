"""Facts: streamed import with per-line rejects and no duplicates, filters, one fact, retraction."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from conftest import Broker, auth
from db.helpers import add_facts, add_model
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.app import create_app
from qfedit import registry
from qfedit.config import Settings
from qfedit.db import FactRow, FactStatus

NDJSON = {"Content-Type": "application/x-ndjson"}


def _line(i: int, **extra: object) -> str:
    return json.dumps(
        {
            "question": f"Who made thing {i}?",
            "answer": f"Maker {i}",
            "context": f"Maker {i} made thing {i}.",
            **extra,
        }
    )


def _corpus() -> bytes:
    lines = [
        _line(1),
        "{not json",
        _line(2, subject="thing 2"),
        json.dumps({"question": "Q?", "answer": "", "context": "c"}),
        "",
        _line(1),  # the same fact again: skipped, not an error
        _line(3),
    ]
    return ("\n".join(lines) + "\n").encode()


def _count(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(FactRow)) or 0


def test_import_reports_rejects_by_line_and_never_imports_twice(client: TestClient, db: Session) -> None:
    add_model(db)
    db.commit()
    headers = {**auth("writer"), **NDJSON}
    first = client.post(
        "/v1/models/tiny/facts/import", content=_corpus(), headers=headers, params={"source": "corpus.jsonl"}
    )
    assert first.status_code == 200, first.text
    result = first.json()
    assert (result["read"], result["imported"], result["duplicates"], result["rejected"]) == (6, 3, 1, 2)
    assert [(r["line"], r["field"]) for r in result["rejects"]] == [(2, "(json)"), (4, "answer")]
    assert result["rejects"][0]["record"] == "{not json"
    assert not result["rejects_truncated"]
    # Sent again (a client retry): nothing new.
    again = client.post(
        "/v1/models/tiny/facts/import", content=_corpus(), headers=headers, params={"source": "corpus.jsonl"}
    ).json()
    assert (again["imported"], again["duplicates"]) == (0, 4)
    assert _count(db) == 3
    facts = client.get("/v1/facts", params={"model": "tiny"}, headers=auth("reader")).json()["items"]
    assert {(f["source"], f["source_line"]) for f in facts} == {
        ("corpus.jsonl", 1),
        ("corpus.jsonl", 3),
        ("corpus.jsonl", 7),
    }
    imports = client.get("/v1/audit", params={"action": "facts.import"}, headers=auth("reader")).json()
    assert [e["actor"] for e in imports] == ["writer", "writer"]


def test_import_streams_a_chunked_csv_body(client: TestClient, db: Session) -> None:
    add_model(db)
    db.commit()

    def body() -> Iterator[bytes]:
        yield b"question,answer,context,paraphrases\n"
        for i in range(50):
            yield f'Who made {i}?,Maker {i},Maker {i} made {i}.,"[""Maker of {i}?""]"\n'.encode()
        yield b"Q only?,,\n"

    response = client.post(
        "/v1/models/tiny/facts/import", content=body(), headers={**auth("writer"), "Content-Type": "text/csv"}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["format"], result["imported"], result["rejected"]) == ("csv", 50, 1)
    assert result["rejects"][0]["line"] == 52
    assert _count(db) == 50


@pytest.mark.parametrize(
    ("content", "headers", "status", "field"),
    [
        (b"x", {"Content-Type": "application/pdf"}, 415, "query.format"),
        (b"\xff\xfe,bad\n", {"Content-Type": "text/csv"}, 422, "body.(header)"),
        (b"nope,answer,context\n", {"Content-Type": "text/csv"}, 422, "body.(header)"),
    ],
)
def test_unreadable_uploads_are_4xx_naming_the_field(
    client: TestClient, db: Session, content: bytes, headers: dict[str, str], status: int, field: str
) -> None:
    add_model(db)
    db.commit()
    response = client.post(
        "/v1/models/tiny/facts/import", content=content, headers={**auth("writer"), **headers}
    )
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert _count(db) == 0


@pytest.mark.backends("sqlite")
def test_body_limits(engine: object, settings: Settings, db: Session) -> None:
    add_model(db)
    db.commit()
    small = settings.model_copy(update={"api_max_upload_bytes": 2048, "api_max_body_bytes": 1024})
    with TestClient(create_app(small, enqueue=Broker().enqueue)) as client:
        big = ("\n".join(_line(i) for i in range(100)) + "\n").encode()
        declared = client.post(
            "/v1/models/tiny/facts/import", content=big, headers={**auth("writer"), **NDJSON}
        )
        assert declared.status_code == 413
        assert declared.json()["field"] == "body"
        streamed = client.post(
            "/v1/models/tiny/facts/import",
            content=iter([big[:1500], big[1500:]]),
            headers={**auth("writer"), **NDJSON},
        )
        assert streamed.status_code == 413
        assert streamed.json() == {
            "error": "too_large",
            "message": "body exceeds 2048 bytes",
            "field": "body",
        }
        json_body = client.post(
            "/v1/models/tiny/batches", json={"fact_ids": list(range(1, 400))}, headers=auth("writer")
        )
        assert json_body.status_code == 413
    assert _count(db) == 0


def test_list_filters_and_one_fact_with_its_versions(client: TestClient, db: Session) -> None:
    model = add_model(db)
    ids = add_facts(db, model, 5)
    registry.set_fact_status(db, ids[:2], FactStatus.APPLIED, actor="t", reason="test")
    version = registry.record_version(
        db,
        model=model,
        fact_ids=ids[:2],
        created_by="t",
        reason="test",
        checkpoint=None,
        layer=None,
        rule=None,
    )
    db.commit()
    reader = auth("reader")
    applied = client.get("/v1/facts", params={"model": "tiny", "status": "applied"}, headers=reader).json()[
        "items"
    ]
    assert [f["id"] for f in applied] == ids[:2]
    assert [f["id"] for f in client.get("/v1/facts", params={"q": "a3"}, headers=reader).json()["items"]] == [
        ids[3]
    ]
    assert client.get("/v1/facts", params={"q": "100%_"}, headers=reader).json()["items"] == []
    assert (
        len(
            client.get(
                "/v1/facts", params={"source": "test", "limit": 2, "offset": 1}, headers=reader
            ).json()["items"]
        )
        == 2
    )
    detail = client.get(f"/v1/facts/{ids[0]}", headers=reader).json()
    assert detail["model"] == "tiny"
    assert detail["versions"] == [{"number": version.number, "label": "tiny@1"}]
    assert client.get(f"/v1/facts/{ids[4]}", headers=reader).json()["versions"] == []
    missing = client.get("/v1/facts/999999", headers=reader)
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    unknown = client.get("/v1/facts", params={"model": "nope"}, headers=reader)
    assert unknown.status_code == 404
    assert "tiny" in unknown.json()["message"]  # names the registered models


def test_retract_queues_a_retraction_batch(client: TestClient, db: Session, broker: Broker) -> None:
    model = add_model(db)
    ids = add_facts(db, model, 3)
    db.commit()
    headers = {**auth("writer"), "Idempotency-Key": "retract-1"}
    body = {"fact_ids": ids[:2], "reason": "wrong founder"}
    first = client.post("/v1/models/tiny/facts/retract", json=body, headers=headers)
    assert first.status_code == 202, first.text
    batch = first.json()
    assert (batch["kind"], batch["reason"], batch["fact_count"], batch["requested_by"]) == (
        "retract",
        "wrong founder",
        2,
        "writer",
    )
    again = client.post("/v1/models/tiny/facts/retract", json=body, headers=headers).json()
    assert again["id"] == batch["id"]
    assert broker.sent == [batch["id"], batch["id"]]  # re-sent while still queued; tasks are idempotent
    no_reason = client.post(
        "/v1/models/tiny/facts/retract", json={"fact_ids": ids[:1], "reason": ""}, headers=auth("writer")
    )
    assert (no_reason.status_code, no_reason.json()["field"]) == (422, "body.reason")


def test_unstorable_text_is_a_per_line_reject(client: TestClient, db: Session) -> None:
    """NUL (PostgreSQL cannot store it) and lone surrogates reject their line, not the upload."""
    add_model(db)
    db.commit()
    lines = [
        json.dumps({"question": "Q\x00?", "answer": "A", "context": "C"}),
        json.dumps({"question": "Q?", "answer": "A\ud800", "context": "C"}),
        json.dumps(
            {
                "question": "Q?",
                "answer": "A",
                "context": "C",
                "neighbors": [{"question": "\x00", "answer": "b"}],
            }
        ),
        _line(1),
    ]
    response = client.post(
        "/v1/models/tiny/facts/import",
        content="\n".join(lines).encode(),
        headers={**auth("writer"), **NDJSON},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["imported"], result["rejected"]) == (1, 3)
    assert [(r["line"], r["field"]) for r in result["rejects"]] == [
        (1, "question"),
        (2, "answer"),
        (3, "neighbors.0.question"),
    ]
    assert _count(db) == 1


def test_the_source_name_is_only_a_label(client: TestClient, db: Session) -> None:
    # Saved under the caller's name, this upload was its own rejects file (`NAME.part`), and the
    # import read what it wrote for ever.
    add_model(db)
    db.commit()
    body = b"".join(b'{"question": "Q%d?", "answer": "", "context": "C"}\n' % i for i in range(50))
    body += b'{"question": "Q?", "answer": "A", "context": "C"}\n'
    done: list[object] = []

    def upload() -> None:
        done.append(
            client.post(
                "/v1/models/tiny/facts/import?source=rejects.jsonl.part",
                content=body,
                headers={**auth("writer"), "Content-Type": "application/x-ndjson"},
            )
        )

    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert done, "the import did not finish"
    response = done[0]
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    result = response.json()  # type: ignore[attr-defined]
    assert (result["read"], result["imported"], result["rejected"]) == (51, 1, 50)
    assert result["source"] == "rejects.jsonl.part"
    (fact,) = registry.list_facts(db, source="rejects.jsonl.part")
    assert fact.question == "Q?"


def test_the_audit_entry_of_an_upload_names_no_server_path(client: TestClient, db: Session) -> None:
    # The attack: a read token listed the audit log and found the server's temporary upload paths.
    add_model(db)
    db.commit()
    response = client.post(
        "/v1/models/tiny/facts/import",
        content=_corpus(),
        headers={**auth("writer"), **NDJSON},
        params={"source": "corpus.jsonl"},
    )
    assert response.json()["rejected"] == 2
    (entry,) = client.get("/v1/audit", params={"action": "facts.import"}, headers=auth("reader")).json()
    details = entry["details"]
    assert (details["source"], details["rejected"]) == ("corpus.jsonl", 2)
    assert details["rejects_path"] == "returned in the response"
    assert "qfedit-upload-" not in json.dumps(entry) and "/tmp" not in json.dumps(entry)
