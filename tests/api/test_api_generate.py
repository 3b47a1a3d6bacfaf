"""Generation pinned to a version or alias, on a tiny real model, against the library's answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import auth
from db.helpers import add_facts
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from tiny_models import FACTS, build_model

from qfedit import registry
from qfedit.config import Settings
from qfedit.delta import applied
from qfedit.edit import make_delta
from qfedit.generate import answer
from qfedit.hparams import EditConfig, SolveConfig
from qfedit.modeling import load_model
from qfedit.store import LocalStore

pytestmark = pytest.mark.backends("sqlite")  # the model, not the database, is what this exercises


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("api-model") / "qwen2", "qwen2")


def test_generate_follows_the_version_asked_for(
    client: TestClient, db: Session, settings: Settings, tiny_qwen: Path
) -> None:
    loaded = load_model(tiny_qwen)
    delta = make_delta(loaded, FACTS, EditConfig(layer=1, solve=SolveConfig(rule="seed"))).delta
    model = registry.add_model(
        db, name="tiny", source=str(tiny_qwen), fingerprint=loaded.fingerprint, actor="t", default_layer=1
    )
    ids = add_facts(db, model, 1)
    stored = LocalStore(settings.store_dir).put_bytes(delta.to_bytes())
    version = registry.record_version(
        db, model=model, fact_ids=ids, created_by="t", reason="r", checkpoint=stored, layer=1, rule="seed"
    )
    registry.set_alias(db, name="production", version=version, reason="release", actor="t")
    db.commit()

    fact = FACTS[0]
    with applied(loaded, delta):
        edited = answer(loaded, fact.question)
    base = answer(loaded, fact.question)
    assert edited != base  # otherwise the check below could not tell the versions apart
    reader = auth("reader")
    by_alias = client.post("/v1/models/tiny/generate", json={"question": fact.question}, headers=reader)
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json() == {"model": "tiny", "version": "tiny@1", "number": 1, "answer": edited}
    pinned = client.post(
        "/v1/models/tiny/generate", json={"question": fact.question, "version": "0"}, headers=reader
    )
    assert (pinned.json()["version"], pinned.json()["answer"]) == ("tiny@0", base)

    too_long = client.post("/v1/models/tiny/generate", json={"question": "who " * 200}, headers=reader)
    assert (too_long.status_code, too_long.json()["field"]) == (422, "body.question")
    limit = settings.api_max_prompt_chars
    over = client.post(
        "/v1/models/tiny/generate", json={"question": "q", "context": "c" * (limit + 1)}, headers=reader
    )
    assert (over.status_code, over.json()["field"]) == (422, "body.context")
    unknown = client.post(
        "/v1/models/tiny/generate", json={"question": "q", "version": "canary"}, headers=reader
    )
    assert unknown.status_code == 404
