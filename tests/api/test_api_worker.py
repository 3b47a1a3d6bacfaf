"""The API's flows end to end: real Redis, a real `qfedit worker` process, a real database.

Facts go in through the upload, a batch through `POST .../batches` (sent to the broker by
`worker.client`, not a stand-in), the worker publishes a version, and the API shows it, serves
its delta, answers with it, and retracts facts from it.
"""

from __future__ import annotations

import time

import pytest
from conftest import TOKENS, auth
from fastapi.testclient import TestClient
from pipeline import conftest as pipeline_fixtures

from api.app import create_app
from qfedit.facts import write_jsonl

# The queue tests' cluster (Redis server, worker processes, tiny model), reused.
cluster = pipeline_fixtures.cluster
redis_server = pipeline_fixtures.redis_server
Cluster = pipeline_fixtures.Cluster

pytestmark = pytest.mark.slow


def _wait(client: TestClient, batch_id: int, timeout: float = 180.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}", headers=auth("reader")).json()
        if batch["status"] in ("published", "failed", "cancelled"):
            return batch  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} did not finish in {timeout}s")


def test_import_enqueue_publish_show_generate_retract(cluster: Cluster) -> None:  # type: ignore[valid-type]
    cluster.add_model("tiny", [])
    corpus = cluster.root / "corpus.jsonl"
    write_jsonl([pipeline_fixtures.fact(i) for i in range(4)], corpus)
    cluster.start_worker("a")
    settings = cluster.settings().model_copy(update={"api_tokens": TOKENS})
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        writer = auth("writer")
        imported = client.post(
            "/v1/models/tiny/facts/import",
            content=corpus.read_bytes(),
            headers={**writer, "Content-Type": "application/x-ndjson"},
        ).json()
        assert imported["imported"] == 4

        batch = client.post(
            "/v1/models/tiny/batches", json={}, headers={**writer, "Idempotency-Key": "flow-1"}
        )
        assert batch.status_code == 202, batch.text
        done = _wait(client, batch.json()["id"])
        assert (done["status"], done["progress"], done["requested_by"]) == ("published", 1.0, "writer"), done
        label = done["version"]
        assert label == "tiny@1"

        shown = client.get("/v1/models/tiny/versions/head", headers=auth("reader")).json()
        assert (shown["label"], shown["facts_added"], shown["fact_count"]) == (label, 4, 4)
        assert shown["relative_update_norm"] > 0
        delta = client.get("/v1/models/tiny/versions/1/delta", headers=auth("reader"))
        assert delta.status_code == 200
        assert delta.headers["x-checkpoint-sha256"] == shown["checkpoint_sha256"]
        reply = client.post(
            "/v1/models/tiny/generate",
            json={"question": "Who founded Company0?", "version": "head"},
            headers=auth("reader"),
        ).json()
        assert reply["version"] == label

        fact_ids = [
            f["id"]
            for f in client.get("/v1/facts", params={"model": "tiny"}, headers=auth("reader")).json()["items"]
        ]
        retraction = client.post(
            "/v1/models/tiny/facts/retract",
            json={"fact_ids": fact_ids[:1], "reason": "wrong founder"},
            headers=writer,
        )
        assert retraction.status_code == 202, retraction.text
        retracted = _wait(client, retraction.json()["id"])
        assert retracted["status"] == "published", retracted
        diff = client.get(
            "/v1/models/tiny/diff", params={"from": "1", "to": "2"}, headers=auth("reader")
        ).json()
        assert [f["id"] for f in diff["facts_removed"]] == fact_ids[:1]
        assert client.get(f"/v1/facts/{fact_ids[0]}", headers=auth("reader")).json()["status"] == "retracted"
