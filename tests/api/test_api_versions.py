"""Versions (list, show, diff, delta download), aliases (move, compare-and-set, history), audit log."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import auth
from db.helpers import add_facts, add_model
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.config import Settings
from qfedit.delta import Delta
from qfedit.store import LocalStore

PARAMETER = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def history(db: Session, settings: Settings) -> list[int]:
    """tiny@1 holds facts 0-2 (delta 1), tiny@2 holds 1-3 (delta 2); returns the fact ids."""
    model = add_model(db)
    ids = add_facts(db, model, 4)
    store = LocalStore(settings.store_dir)
    for number, (facts, scale) in enumerate([(ids[:3], 1.0), (ids[1:], 3.0)], start=1):
        delta = Delta({PARAMETER: torch.full((2, 3), scale)}, base_fingerprint=model.fingerprint)
        stored = store.put_bytes(delta.to_bytes())
        registry.record_version(
            db,
            model=model,
            fact_ids=facts,
            created_by="worker",
            reason=f"batch {number}",
            checkpoint=stored,
            layer=0,
            rule="preserve",
            relative_update_norm=0.01 * number,
            metrics={"efficacy": 0.5 * number},
        )
    db.commit()
    return ids


def test_list_and_show(client: TestClient, history: list[int]) -> None:
    reader = auth("reader")
    listed = client.get("/v1/models/tiny/versions", headers=reader).json()
    assert [v["label"] for v in listed] == ["tiny@0", "tiny@1", "tiny@2"]
    shown = client.get("/v1/models/tiny/versions/2", headers=reader).json()
    assert (shown["facts_added"], shown["facts_removed"], shown["parent"]) == (1, 1, 1)
    assert shown["relative_update_norm"] == pytest.approx(0.02)
    assert len(shown["checkpoint_sha256"]) == 64
    assert client.get("/v1/models/tiny/versions/7", headers=reader).status_code == 404
    assert client.get("/v1/models/tiny/versions/99999999999", headers=reader).status_code == 422


def test_diff(client: TestClient, history: list[int]) -> None:
    diff = client.get("/v1/models/tiny/diff", params={"from": "1", "to": "2"}, headers=auth("reader")).json()
    assert [f["id"] for f in diff["facts_added"]] == [history[3]]
    assert [f["id"] for f in diff["facts_removed"]] == [history[0]]
    assert diff["metric_changes"] == {"efficacy": {"old": 0.5, "new": 1.0}}
    assert diff["weight_difference_norm"] == pytest.approx(2.0 * 6**0.5)
    capped = client.get(
        "/v1/models/tiny/diff", params={"from": "0", "to": "2", "limit": 1}, headers=auth("reader")
    )
    assert (capped.json()["facts_added_total"], len(capped.json()["facts_added"])) == (3, 1)


def test_delta_download_is_the_verified_file(
    client: TestClient, history: list[int], settings: Settings
) -> None:
    response = client.get("/v1/models/tiny/versions/1/delta", headers=auth("reader"))
    assert response.status_code == 200
    sha = response.headers["x-checkpoint-sha256"]
    assert hashlib.sha256(response.content).hexdigest() == sha
    base = client.get("/v1/models/tiny/versions/0/delta", headers=auth("reader"))
    assert (base.status_code, base.json()["field"]) == (404, "path.ref")
    # A corrupted file is refused, not served.
    path = LocalStore(settings.store_dir).resolve(LocalStore.relative_path(sha))
    path.write_bytes(b"garbage")
    corrupt = client.get("/v1/models/tiny/versions/1/delta", headers=auth("reader"))
    assert corrupt.status_code == 500
    assert corrupt.json()["error"] == "store_error"
    assert str(settings.store_dir.resolve()) not in corrupt.text and sha not in corrupt.json()["message"]


def test_alias_moves_compare_and_set_and_history(client: TestClient, history: list[int]) -> None:
    writer, reader = auth("writer"), auth("reader")
    url = "/v1/models/tiny/aliases/staging"
    created = client.put(
        url, json={"version": "2", "reason": "try it", "expect_revision": None}, headers=writer
    )
    assert created.status_code == 200, created.text
    assert (created.json()["label"], created.json()["revision"]) == ("tiny@2", 1)
    stale = client.put(
        url, json={"version": "1", "reason": "roll back", "expect_revision": 7}, headers=writer
    )
    assert (stale.status_code, stale.json()["error"]) == (409, "conflict")
    rolled = client.put(
        url, json={"version": "1", "reason": "roll back", "expect_revision": 1}, headers=writer
    )
    assert rolled.json()["revision"] == 2
    copied = client.put(
        "/v1/models/tiny/aliases/production",
        json={"version": "staging", "reason": "promote"},
        headers=auth("admin"),
    )
    assert copied.json()["label"] == "tiny@1"
    assert [a["name"] for a in client.get("/v1/models/tiny/aliases", headers=reader).json()] == [
        "production",
        "staging",
    ]
    moves = client.get(f"{url}/history", headers=reader).json()
    assert [(m["from_version"], m["to_version"], m["moved_by"], m["reason"]) for m in moves] == [
        (None, 2, "writer", "try it"),
        (2, 1, "writer", "roll back"),
    ]
    assert client.get("/v1/models/tiny/aliases/nope/history", headers=reader).status_code == 404
    shown = client.get("/v1/models/tiny/versions/production", headers=reader).json()
    assert shown["aliases"] == ["production", "staging"]


def test_look_alike_alias_names_are_refused_naming_the_field(client: TestClient, history: list[int]) -> None:
    """The attack: `Production`, `PRODUCTION` or `production.` created beside `production`
    (by a write token, which may not move `production` itself)."""
    for look_alike in ("Production", "PRODUCTION", "production.", "production%0A", "-production"):
        refused = client.put(
            f"/v1/models/tiny/aliases/{look_alike}",
            json={"version": "2", "reason": "confuse"},
            headers=auth("admin"),
        )
        assert refused.status_code == 422, (look_alike, refused.text)
        assert refused.json()["field"] == "path.name", refused.json()
    assert client.get("/v1/models/tiny/aliases", headers=auth("reader")).json() == []
    made = client.put(
        "/v1/models/tiny/aliases/canary-2", json={"version": "2", "reason": "ok"}, headers=auth("writer")
    )
    assert made.status_code == 200, made.text


def test_audit_filters(client: TestClient, history: list[int], db: Session) -> None:
    client.put(
        "/v1/models/tiny/aliases/staging", json={"version": "1", "reason": "r"}, headers=auth("writer")
    )
    reader = auth("reader")
    everything = client.get("/v1/audit", headers=reader).json()
    assert everything[0]["action"] == "alias.set"  # newest first
    by_actor = client.get(
        "/v1/audit", params={"actor": "worker", "object_type": "version"}, headers=reader
    ).json()
    assert [e["details"]["version"] for e in by_actor] == ["tiny@2", "tiny@1"]
    assert client.get("/v1/audit", params={"since": "2999-01-01T00:00:00"}, headers=reader).json() == []
    far = client.get("/v1/audit", params={"since": "0001-01-01T00:00:00+05:00"}, headers=reader)
    assert (far.status_code, far.json()["field"]) == (422, "query.since")
    assert len(client.get("/v1/audit", params={"limit": 2}, headers=reader).json()) == 2
    # By model: every entry about tiny (model, facts, versions, alias), none about another model.
    other = add_model(db, name="other")
    add_facts(db, other, 1)
    db.commit()
    tiny = client.get("/v1/audit", params={"model": "tiny", "limit": 1000}, headers=reader).json()
    others = client.get("/v1/audit", params={"model": "other", "limit": 1000}, headers=reader).json()
    assert {e["object_type"] for e in tiny} >= {"model", "version", "alias"}
    assert {e["model_id"] for e in tiny} == {history_model_id(db, "tiny")}
    assert [e["action"] for e in others] == ["model.add"]
    assert len(tiny) + len(others) == len(
        client.get("/v1/audit", params={"limit": 1000}, headers=reader).json()
    )
    assert client.get("/v1/audit", params={"until": "2000-01-01T00:00:00"}, headers=reader).json() == []
    assert client.get("/v1/audit", params={"model": "nope"}, headers=reader).status_code == 404


def history_model_id(db: Session, name: str) -> int:
    return registry.get_model(db, name).id


def test_descriptions_tags_and_archiving_are_edited_audited_and_never_delete(
    client: TestClient, db: Session, history: list[int], settings: Settings
) -> None:
    writer, reader = auth("writer"), auth("reader")
    described = client.patch(
        "/v1/models/tiny",
        json={"description": "the support bot's base", "tags": {"team": "support", "stage": "pilot"}},
        headers=writer,
    )
    assert described.status_code == 200, described.text
    assert described.json()["tags"] == {"team": "support", "stage": "pilot"}
    untagged = client.patch("/v1/models/tiny", json={"remove_tags": ["stage"]}, headers=writer).json()
    assert untagged["tags"] == {"team": "support"} and untagged["description"] == "the support bot's base"
    assert client.patch("/v1/models/tiny", json={"tags": {"x": "1"}}, headers=reader).status_code == 403
    refused = client.patch("/v1/models/tiny", json={"tags": {"bad key!": "1"}}, headers=writer)
    assert refused.status_code == 422 and "bad key!" in refused.json()["message"]

    version = client.patch(
        "/v1/models/tiny/versions/1",
        json={"description": "first cut", "tags": {"ticket": "QF-12"}},
        headers=writer,
    ).json()
    assert (version["description"], version["tags"], version["archived"]) == (
        "first cut",
        {"ticket": "QF-12"},
        False,
    )
    # An alias's version is not archived; another is, and leaves the listing but not the store.
    registry.set_alias(
        db, name="production", version=registry.get_version(db, "tiny@2"), reason="r", actor="admin"
    )
    db.commit()
    held = client.patch(
        "/v1/models/tiny/versions/2", json={"archived": True, "reason": "old"}, headers=writer
    )
    assert held.status_code == 409 and "production" in held.json()["message"]
    no_reason = client.patch("/v1/models/tiny/versions/1", json={"archived": True}, headers=writer)
    assert no_reason.status_code == 422 and no_reason.json()["field"].endswith("reason")
    archived = client.patch(
        "/v1/models/tiny/versions/1", json={"archived": True, "reason": "superseded"}, headers=writer
    )
    assert archived.status_code == 200 and archived.json()["archived"] is True
    listed = [v["label"] for v in client.get("/v1/models/tiny/versions", headers=reader).json()]
    assert listed == ["tiny@0", "tiny@2"]
    everything = client.get("/v1/models/tiny/versions", params={"archived": True}, headers=reader).json()
    assert [v["label"] for v in everything] == ["tiny@0", "tiny@1", "tiny@2"]
    one = registry.get_version(db, "tiny@1")
    assert one.checkpoint_path is not None
    LocalStore(settings.store_dir).verified_local_file(one.checkpoint_path, one.checkpoint_sha256 or "")
    moved = client.put(
        "/v1/models/tiny/aliases/candidate", json={"version": "1", "reason": "try"}, headers=writer
    )
    assert moved.status_code == 409 and "archived" in moved.json()["message"]
    restored = client.patch(
        "/v1/models/tiny/versions/1", json={"archived": False, "reason": "needed"}, headers=writer
    )
    assert restored.json()["archived"] is False
    actions = [e["action"] for e in client.get("/v1/audit", headers=reader).json()]
    for action in ("model.described", "version.described", "version.archived", "version.restored"):
        assert action in actions, action
