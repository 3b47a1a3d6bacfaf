"""What lists facts has a size budget (issue 27, item 1): `GET /v1/facts?limit=1000` returned
449 MB, a console fact page 126 MB in 33 s, every text search took 5-10 s, once facts of
megabytes were stored. Facts that large can no longer be imported; these are stored directly, as
ones imported before the limits were."""

from __future__ import annotations

import json
import time

import pytest
from conftest import auth
from db.helpers import add_facts, add_model
from fastapi.testclient import TestClient
from sqlalchemy import insert
from sqlalchemy.orm import Session

from api.routes import facts as facts_route
from qfedit.db import FactRow, Model
from qfedit.facts import Fact
from qfedit.registry.facts import PREVIEW_CHARS

HUGE = 5 << 20  # characters of each stored context


def _huge_facts(db: Session, model: Model, count: int) -> list[int]:
    ids = []
    for i in range(count):
        fact = Fact(
            question=f"Who made huge thing {i}?", answer=f"Maker {i}", context=f"Maker {i} " + "x" * HUGE
        )
        ids.append(
            db.execute(
                insert(FactRow)
                .values(
                    model_id=model.id,
                    content_hash=fact.content_hash(),
                    question=fact.question,
                    answer=fact.answer,
                    context=fact.context,
                    paraphrases=["p?"] * 20000,
                    source="before-limits",
                )
                .returning(FactRow.id)
            ).scalar_one()
        )
    return ids


def test_a_fact_list_cuts_long_text_says_so_and_ends_at_its_budget(
    client: TestClient, db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = add_model(db)
    short = add_facts(db, model, 2)
    huge = _huge_facts(db, model, 3)
    db.commit()
    reader = auth("reader")
    # A budget of about two cut facts, so that the third ends the page.
    monkeypatch.setattr(facts_route, "LIST_BUDGET_CHARS", 2 * PREVIEW_CHARS + 10_000)
    response = client.get("/v1/facts", params={"model": "tiny", "limit": 1000}, headers=reader)
    assert response.status_code == 200
    assert len(response.content) < 200_000, f"{len(response.content)} bytes"
    page = response.json()
    assert [f["id"] for f in page["items"]] == [*short, *huge[:2]]
    assert page["next_offset"] == 4
    cut = page["items"][2]
    assert cut["truncated"] == ["context", "paraphrases"] and cut["paraphrases"] == []
    assert len(cut["context"]) == PREVIEW_CHARS and cut["context"].startswith("Maker 0 xxx")
    assert page["items"][0]["truncated"] == [] and page["items"][0]["context"] == "A0 is the answer to Q0."
    rest = client.get("/v1/facts", params={"model": "tiny", "offset": 4}, headers=reader).json()
    assert [f["id"] for f in rest["items"]] == [huge[2]] and rest["next_offset"] is None
    # One fact by id is the whole fact.
    whole = client.get(f"/v1/facts/{huge[0]}", headers=reader).json()
    assert len(whole["context"]) == HUGE + 8 and whole["truncated"] == []


def test_search_and_console_pages_read_no_more_than_they_show(client: TestClient, db: Session) -> None:
    model = add_model(db)
    huge = _huge_facts(db, model, 3)
    db.commit()
    reader = auth("reader")
    started = time.monotonic()
    found = client.get("/v1/facts", params={"q": "maker 1 x"}, headers=reader)
    assert [f["id"] for f in found.json()["items"]] == [huge[1]]
    assert len(found.content) < 100_000
    # Past the first SEARCH_CHARS characters of a field, a search does not look.
    assert client.get("/v1/facts", params={"q": "xxxxxxy"}, headers=reader).json()["items"] == []
    search = client.get("/ui/part/facts", params={"q": "huge thing"}, headers=reader)
    assert search.status_code == 200 and len(search.content) < 100_000
    page = client.get(f"/ui/part/facts/{huge[0]}", headers=reader)
    assert page.status_code == 200 and len(page.content) < 100_000
    assert "(cut)" in page.text and "too many to show" in page.text
    assert time.monotonic() - started < 30
    assert client.get("/ui/part/facts/999999", headers=reader).status_code == 404


def test_an_import_response_cuts_a_long_rejected_record(client: TestClient, db: Session) -> None:
    """A record rejected for a field over its limit is sent back as the start of its JSON."""
    add_model(db)
    db.commit()
    line = json.dumps({"question": "Q?", "answer": "A", "context": "c" * (1 << 20)})
    response = client.post(
        "/v1/models/tiny/facts/import",
        content=(line + "\n").encode(),
        headers={**auth("writer"), "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 200, response.text
    assert len(response.content) < 100_000
    (reject,) = response.json()["rejects"]
    assert reject["field"] == "context" and "more than the limit of 16000" in reject["reason"]
    assert isinstance(reject["record"], str) and reject["record"].endswith(f"({len(line)} characters in all)")
