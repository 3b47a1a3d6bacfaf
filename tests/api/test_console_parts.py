"""The console's page parts on both databases: the same auth as the API, headers that keep the
pages to this origin, and the paged history queries (diff, versions, search, audit) agreeing
with the registry's own answers."""

from __future__ import annotations

import re

import pytest
from conftest import auth
from db.helpers import add_facts, add_model
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from api.console import pages
from qfedit import registry
from qfedit.db.models import FactRow
from qfedit.registry import history


@pytest.fixture
def model_history(db: Session) -> list[int]:
    """tiny@1: facts 0-5; tiny@2: 2-7 with 1 superseded by 6 (0 retracted, 1 replaced, 6 and 7 new)."""
    model = add_model(db)
    ids = add_facts(db, model, 8)
    db.execute(update(FactRow).where(FactRow.id == ids[1]).values(superseded_by_id=ids[6]))
    for number, facts in enumerate([ids[:6], ids[2:]], start=1):
        registry.record_version(
            db,
            model=model,
            fact_ids=facts,
            created_by="worker",
            reason=f"batch {number}",
            checkpoint=None,
            layer=0,
            rule="seed",
            relative_update_norm=0.1,
            metrics={"efficacy": 0.9, "specificity": 0.95, "protocol": {"held_out": number == 2}},
        )
    db.commit()
    return ids


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<td class="num"><a href="/ui/facts/(\d+)">', html)]


def test_parts_need_a_token_as_the_api_does_and_the_shell_holds_no_data(
    client: TestClient, model_history: list[int]
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-0000000000000000"}):
        part = client.get("/ui/part/models/tiny", headers=headers)
        api = client.get("/v1/models/tiny", headers=headers)
        assert part.status_code == api.status_code == 401
        assert part.json() == api.json()
    shell = client.get("/ui/models/tiny/versions/2")
    assert shell.status_code == 200 and "Q1?" not in shell.text and "tiny" not in shell.text
    csp = shell.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert "set-cookie" not in shell.headers
    assert client.get("/ui/static/console.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/static/pages.py").status_code == 404
    missing = client.get("/ui/part/nothing/here", headers=auth("reader"))
    assert (missing.status_code, missing.json()["field"]) == (404, "path")


def test_the_version_part_pages_the_diff_the_registry_computes(
    client: TestClient, db: Session, model_history: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = model_history
    model = registry.get_model(db, "tiny")
    old, new = registry.get_version(db, "1", model=model), registry.get_version(db, "2", model=model)
    diff = registry.diff_versions(db, old, new)
    assert history.diff_counts(db, new) == {
        "added": len(diff.added),
        "retracted": len(diff.removed),
        "superseded": len(diff.updated),
    }
    monkeypatch.setattr(pages, "FACT_PAGE", 1)  # one fact a page, so paging is exercised
    seen = {}
    for kind, expected in (
        ("added", [ids[7]]),
        ("retracted", [ids[0]]),
        ("superseded", [ids[1]]),
    ):
        html = client.get(f"/ui/part/models/tiny/versions/2?show={kind}", headers=auth("reader")).text
        seen[kind] = _ids(html)
        assert seen[kind] == expected, kind
    superseded = client.get("/ui/part/models/tiny/versions/2?show=superseded", headers=auth("reader")).text
    assert f'href="/ui/facts/{ids[6]}">fact {ids[6]}</a>: A6' in superseded
    # The first version added all six against the base, on two pages... of one fact each: six.
    pages_seen = [
        _ids(client.get(f"/ui/part/models/tiny/versions/1?page={p}", headers=auth("reader")).text)
        for p in range(1, 7)
    ]
    assert [i for page in pages_seen for i in page] == ids[:6]
    assert "Page 6 of 6" in client.get("/ui/part/models/tiny/versions/1?page=6", headers=auth("reader")).text
    assert client.get("/ui/part/models/tiny/versions/2?show=nope", headers=auth("reader")).status_code == 422
    # A version that only takes facts out opens on them, not on "added: 0".
    registry.record_version(
        db,
        model=model,
        fact_ids=ids[3:],
        created_by="worker",
        reason="retract fact 2",
        checkpoint=None,
        layer=0,
        rule="seed",
        relative_update_norm=0.1,
        metrics={},
    )
    db.commit()
    opened = client.get("/ui/part/models/tiny/versions/3", headers=auth("reader")).text
    assert _ids(opened) == [ids[2]] and "No fact was added" not in opened
    assert '<strong aria-current="page">retracted: 1</strong>' in opened
    assert _ids(client.get("/ui/part/models/tiny/versions/2", headers=auth("reader")).text) == [ids[7]]
    assert client.get("/ui/part/models/tiny/versions/9", headers=auth("reader")).status_code == 404


def test_model_search_and_fact_parts(client: TestClient, db: Session, model_history: list[int]) -> None:
    ids = model_history
    page = client.get("/ui/part/models/tiny", headers=auth("reader")).text
    assert re.findall(r'<td><a href="/ui/models/tiny/versions/(\d+)">', page) == ["2", "1", "0"]
    assert "Specificity (mixed)" in page  # v1 in-sample, v2 held out: the legend says so
    assert page.count('data-series="efficacy"') == 1
    found = client.get("/ui/part/facts", params={"q": "q3?"}, headers=auth("reader")).text
    assert _ids(found) == [ids[3]]
    by_id = client.get("/ui/part/facts", params={"q": str(ids[5])}, headers=auth("reader")).text
    assert ids[5] in _ids(by_id)
    fact = client.get(f"/ui/part/facts/{ids[1]}", headers=auth("reader")).text
    assert "tiny@1</a></li>" in fact and "tiny@2" not in fact  # in v1 only (replaced in v2)
    assert f'href="/ui/facts/{ids[6]}">fact {ids[6]}</a>' in fact
    spanning = client.get(f"/ui/part/facts/{ids[3]}", headers=auth("reader")).text
    assert "tiny@1</a> to <a" in spanning and "(2 versions)" in spanning
    bad = client.get("/ui/part/facts", params={"model": "a b"}, headers=auth("reader"))
    assert (bad.status_code, bad.json()["field"]) == (422, "query.model")
