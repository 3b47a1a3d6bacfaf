"""Crashes and misdeliveries end with exactly one version per batch, no referenced half-written
checkpoint, and no fact lost or counted twice. PostgreSQL, the production database."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, func, select, text

from qfedit import registry
from qfedit.db import FactCapture, Version
from qfedit.store import LocalStore

from .conftest import Cluster, fact

pytestmark = pytest.mark.backends("postgresql")


def _assert_consistent(cluster: Cluster, batch_id: int, facts: int) -> Version:
    (version,) = cluster.versions_of_batch(batch_id)
    store = LocalStore(cluster.root / "data" / "store")
    with cluster.sessions() as session:
        assert session.scalar(select(func.count()).select_from(FactCapture)) == facts
        for row in session.scalars(select(Version)):
            if row.checkpoint_path is not None:
                store.verified_local_file(row.checkpoint_path, row.checkpoint_sha256 or "")
        for capture in session.scalars(select(FactCapture)):
            store.verified_local_file(capture.object_path, capture.object_sha256)
    assert version.fact_count == facts
    return version


@pytest.mark.parametrize("stage", ["capture", "solve"])
def test_worker_killed_mid_stage_finishes_after_redelivery(cluster: Cluster, stage: str) -> None:
    cluster.add_model("tiny", [fact(i) for i in range(4)], shard_size=4)
    doomed = cluster.start_worker("doomed", chaos=f"{stage}:30")
    batch_id = cluster.submit("tiny")
    cluster.wait_for_log("doomed", f"chaos: pausing {stage}")
    cluster.kill(doomed)
    cluster.start_worker("rescuer")
    batch = cluster.wait(batch_id, timeout=150)
    assert batch.status.value == "published", batch.error
    _assert_consistent(cluster, batch_id, 4)


def test_a_killed_workers_task_is_handed_on_from_its_heartbeat(cluster: Cluster) -> None:
    # With the broker's visibility timeout at an hour (the default) and no beat, a batch whose
    # worker was killed read `capturing` for as long: now the live worker sees the dead one's
    # heartbeat stop and sends the batch on (within three beats plus one, not an hour). Beats of
    # 2 s here: the test waits out the same rule, 8 s rather than 40.
    slow = {"QFEDIT_VISIBILITY_TIMEOUT": "3600", "QFEDIT_HEARTBEAT_S": "2"}
    cluster.add_model("tiny", [fact(i) for i in range(4)], shard_size=4)
    doomed = cluster.start_worker("doomed", chaos="capture:120", extra_env=slow)
    batch_id = cluster.submit("tiny")
    cluster.wait_for_log("doomed", "chaos: pausing capture")
    cluster.kill(doomed)
    cluster.start_worker("rescuer", extra_env=slow)
    batch = cluster.wait(batch_id, timeout=180)
    assert batch.status.value == "published", batch.error
    rescued = (cluster.root / "worker-rescuer.log").read_text()
    assert f"batch {batch_id}: qfedit.capture_shard (shard" in rescued
    assert "on doomed@test" in rescued and "whose heartbeat stopped: sent on" in rescued
    _assert_consistent(cluster, batch_id, 4)


def test_a_task_that_kills_its_worker_fails_its_batch_after_n_deaths_and_the_queue_goes_on(
    cluster: Cluster,
) -> None:
    # The attack: a task that ends its worker (out of memory mid-capture, os._exit) was delivered
    # again after every death, forever, and the model's line stayed held.
    cluster.add_model("tiny", [fact(i) for i in range(4)], shard_size=4)
    ids = cluster.fact_ids("tiny")
    limit = {"QFEDIT_MAX_TASK_DELIVERIES": "2"}
    poison = cluster.submit("tiny", ids[:2])
    behind = cluster.submit("tiny", ids[2:])  # queued behind it on the model's line
    for death in (1, 2):  # the worker restarts under its name, as systemd or compose restart it
        worker = cluster.start_worker("a", chaos="capture:60", extra_env=limit)
        cluster.wait_for_log("a", "chaos: pausing capture", times=death)
        cluster.kill(worker)
    cluster.start_worker("a", extra_env=limit)
    failed = cluster.wait(poison, timeout=150)
    assert failed.status.value == "failed"
    assert "qfedit.capture_shard (shard" in (failed.error or ""), failed.error
    assert "worker died each time" in (failed.error or "") and "QFEDIT_MAX_TASK_DELIVERIES=2" in (
        failed.error or ""
    )
    assert (
        cluster.root.joinpath("worker-a.log").read_text().count("chaos: pausing capture") == 2
    )  # not run a third time
    done = cluster.wait(behind, timeout=150)
    assert done.status.value == "published", done.error


def test_redis_restart_mid_batch(cluster: Cluster) -> None:
    cluster.add_model("tiny", [fact(i) for i in range(4)], shard_size=4)
    cluster.start_worker("a", chaos="capture:4")
    batch_id = cluster.submit("tiny")
    cluster.wait_for_log("a", "chaos: pausing capture")
    cluster.redis.restart()
    batch = cluster.wait(batch_id, timeout=150)
    assert batch.status.value == "published", batch.error
    _assert_consistent(cluster, batch_id, 4)


def test_postgres_connections_dropped_mid_commit(cluster: Cluster, postgres_admin: object) -> None:
    cluster.add_model("tiny", [fact(i) for i in range(4)], shard_size=4)
    marker = f"qfw{int(time.time() * 1000) % 10**9}"
    cluster.database_url += f"&application_name={marker}"
    cluster.start_worker("a", chaos="solve:4")
    batch_id = cluster.submit("tiny")
    cluster.wait_for_log("a", "chaos: pausing solve")
    admin = create_engine(str(postgres_admin.url))  # type: ignore[attr-defined]
    with admin.begin() as connection:
        killed = connection.execute(
            text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :m"),
            {"m": marker},
        ).scalar_one()
    admin.dispose()
    assert killed >= 1
    batch = cluster.wait(batch_id, timeout=150)
    assert batch.status.value == "published", batch.error
    _assert_consistent(cluster, batch_id, 4)


def test_the_same_tasks_delivered_twice_make_one_version(cluster: Cluster) -> None:
    from worker.client import app_for

    cluster.add_model("tiny", [fact(i) for i in range(4)])
    cluster.start_worker("a")
    batch_id = cluster.submit("tiny")
    app = app_for(cluster.settings())
    app.send_task("qfedit.start_batch", args=[batch_id], queue="default")
    batch = cluster.wait(batch_id)
    assert batch.status.value == "published", batch.error
    # Late duplicates of every step, after the fact.
    app.send_task("qfedit.start_batch", args=[batch_id], queue="default")
    app.send_task("qfedit.solve_batch", args=[batch_id], queue="gpu")
    with cluster.sessions() as session:
        shard_ids = [row[0] for row in session.execute(text("SELECT id FROM batch_shards"))]
    for shard_id in shard_ids:
        app.send_task("qfedit.capture_shard", args=[batch_id, shard_id], queue="gpu")
    time.sleep(8)
    _assert_consistent(cluster, batch_id, 4)
    with cluster.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Version)) == 2  # base + one


def test_poison_batch_fails_with_its_reason_and_the_queue_goes_on(cluster: Cluster) -> None:
    long_context = fact(0).model_copy(update={"context": "Company0 was founded by Person0. " * 40})
    cluster.add_model("tiny", [long_context])
    cluster.start_worker("a")
    poison = cluster.wait(cluster.submit("tiny"))
    assert poison.status.value == "failed"
    assert "field 'context'" in (poison.error or "") and "context is 128" in (poison.error or "")
    # The model's line is free again, and the next batch publishes.
    with cluster.sessions() as session:
        model = registry.get_model(session, "tiny")
        assert model.active_batch_id is None
        ids = [f.id for f in registry.list_facts(session, model=model)]
        from qfedit.facts import write_jsonl
        from qfedit.importing import import_facts

        path = cluster.root / "more.jsonl"
        write_jsonl([fact(i) for i in range(1, 4)], path)
        import_facts(session, path, model, actor="test")
    good = cluster.wait(cluster.submit("tiny", [i for i in cluster.fact_ids("tiny") if i not in ids]))
    assert good.status.value == "published", good.error


def test_an_ill_conditioned_solve_fails_at_once_without_retries(cluster: Cluster) -> None:
    # Nothing about the system changes on a retry: it would fail the same way `task_attempts` times.
    cluster.add_model("tiny", [fact(i) for i in range(3)], solve={"rule": "seed", "max_condition": 1.0001})
    cluster.start_worker("a")
    batch = cluster.wait(cluster.submit("tiny"))
    assert batch.status.value == "failed"
    assert "IllConditionedError" in (batch.error or "") and "condition number" in (batch.error or "")
    log = (cluster.root / "worker-a.log").read_text()
    assert f"batch {batch.id} failed" in log and "retrying" not in log
    with cluster.sessions() as session:
        assert registry.get_model(session, "tiny").active_batch_id is None
        assert session.scalar(select(func.count()).select_from(Version)) == 1  # the base only


def test_concurrent_batches_publish_in_a_line_and_keys_are_idempotent(cluster: Cluster) -> None:
    cluster.add_model("tiny", [fact(i) for i in range(6)])
    ids = cluster.fact_ids("tiny")
    cluster.start_worker("a")
    cluster.start_worker("b")
    first = cluster.submit("tiny", ids[:3], key="k-first")
    second = cluster.submit("tiny", ids[3:], key="k-second")
    assert cluster.submit("tiny", ids[:3], key="k-first") == first
    a, b = cluster.wait(first), cluster.wait(second)
    assert (a.status.value, b.status.value) == ("published", "published")
    (va,), (vb,) = cluster.versions_of_batch(first), cluster.versions_of_batch(second)
    earlier, later = sorted([va, vb], key=lambda v: v.number)
    assert later.parent_id == earlier.id
    assert later.fact_count == 6 and earlier.fact_count == 3
