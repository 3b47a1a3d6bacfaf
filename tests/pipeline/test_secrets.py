"""A client that reaches only the broker learns no secret from the workers: remote control is off
unless configured, and when on, the configuration a worker reports holds no token or password."""

from __future__ import annotations

import json
import time

from celery import Celery

from .conftest import ONLY_PRODUCTION_DB, Cluster, fact

TOKEN = "s3cret-admin-token-that-must-not-leak-0123456789"


def _conf_replies(broker_url: str, wait_s: float) -> list[dict[str, object]] | None:
    client = Celery("outsider", broker=broker_url)  # the broker's address, and nothing else
    deadline = time.monotonic() + wait_s
    replies = None
    while time.monotonic() < deadline and not replies:
        replies = client.control.inspect(timeout=2).conf()
    return list(replies.values()) if replies else None


@ONLY_PRODUCTION_DB
def test_remote_control_is_off_unless_configured(cluster: Cluster) -> None:
    cluster.add_model("tiny", [fact(0)])
    secrets = {"QFEDIT_API_TOKENS": json.dumps({"admin": {"token": TOKEN, "scope": "admin"}})}
    cluster.start_worker("quiet", extra_env=secrets)
    cluster.wait_for_log("quiet", "quiet@test ready.", timeout=60)
    assert _conf_replies(cluster.redis.url, wait_s=4) is None
    cluster.stop_workers()

    cluster.start_worker("chatty", extra_env={**secrets, "QFEDIT_WORKER_REMOTE_CONTROL": "true"})
    replies = _conf_replies(cluster.redis.url, wait_s=30)
    assert replies, "a worker with remote control on should answer"
    text = json.dumps(replies, default=str)
    assert TOKEN not in text
    assert "qfedit_settings" not in text
    # The worker still works: the settings reached the tasks by another way than the configuration.
    batch = cluster.wait(cluster.submit("tiny"))
    assert batch.status.value == "published", batch.error
