"""The batch steps' database logic, without workers: hyper-parameters, the model line, shards."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from qfedit.db import BatchStatus
from qfedit.errors import InvalidInputError
from qfedit.pipeline import lifecycle, steps, submit
from qfedit.pipeline.settings import batch_settings

from .helpers import add_facts, add_model


def test_batch_hyperparameters_override_model_settings_and_typos_are_refused(session: Session) -> None:
    model = add_model(session)
    model.settings = {"layer": 2, "solve": {"rule": "seed"}}
    ids = add_facts(session, model, 3)
    with pytest.raises(ValueError, match=r"field 'hyperparameters.edit.solve.lamb'"):
        submit.submit_batch(
            session, model=model, fact_ids=ids, requested_by="t", hyperparameters={"solve": {"lamb": 1}}
        )
    batch = submit.submit_batch(
        session, model=model, fact_ids=ids, requested_by="t", hyperparameters={"solve": {"lam": 7}}
    )
    settings = batch_settings(batch)
    assert (settings.edit.layer, settings.edit.solve.rule, settings.edit.solve.lam) == (2, "seed", 7.0)


def test_one_batch_holds_a_model_line_and_shards_cover_its_facts(session: Session) -> None:
    model = add_model(session)
    model.settings = {"layer": 1, "shard_size": 2, "solve": {"rule": "seed"}}
    ids = add_facts(session, model, 5)
    first = submit.submit_batch(session, model=model, fact_ids=ids[:3], requested_by="t")
    second = submit.submit_batch(session, model=model, fact_ids=ids[3:], requested_by="t")
    session.commit()

    started = steps.start_batch(session, first.id)
    assert len(started.capture) == 2 and not started.wait  # 3 facts in shards of 2
    assert steps.start_batch(session, second.id).wait  # the line is held
    again = steps.start_batch(session, first.id)  # a redelivered start resends the same shards
    assert sorted(again.capture) == sorted(started.capture)
    session.refresh(first)
    assert first.status == BatchStatus.CAPTURING and first.parent_version_id is not None

    lifecycle.cancel_batch(session, first, actor="t")
    session.commit()
    assert not steps.start_batch(session, second.id).wait  # released by the cancel


def test_a_model_without_an_edit_layer_refuses_a_batch_at_submission(session: Session) -> None:
    model = add_model(session, layer=None)
    ids = add_facts(session, model, 2)
    with pytest.raises(InvalidInputError, match="'tiny' has no edit layer") as refused:
        submit.submit_batch(session, model=model, fact_ids=ids, requested_by="t")
    assert refused.value.field == "hyperparameters.edit.layer"
    batch = submit.submit_batch(
        session, model=model, fact_ids=ids, requested_by="t", hyperparameters={"layer": 0}
    )
    assert batch_settings(batch).edit.layer == 0


def test_pending_means_every_pending_fact_and_none_is_an_error(session: Session) -> None:
    model = add_model(session)
    with pytest.raises(ValueError, match="no pending facts"):
        submit.submit_batch(session, model=model, fact_ids=None, requested_by="t")
    ids = add_facts(session, model, 4)
    batch = submit.submit_batch(
        session, model=model, fact_ids=None, requested_by="t", idempotency_key="nightly:x"
    )
    from qfedit import registry

    assert registry.batch_fact_ids(session, batch) == ids
    assert (
        submit.submit_batch(
            session, model=model, fact_ids=None, requested_by="t", idempotency_key="nightly:x"
        ).id
        == batch.id
    )


def test_progress_counts_captured_facts(session: Session) -> None:
    from qfedit.db import BatchShard, ShardStatus

    model = add_model(session)
    model.settings = {"layer": 1, "shard_size": 2, "solve": {"rule": "seed"}}
    batch = submit.submit_batch(session, model=model, fact_ids=add_facts(session, model, 3), requested_by="t")
    session.commit()
    assert lifecycle.batch_progress(session, batch) == lifecycle.Progress("queued", 3, 0)
    started = steps.start_batch(session, batch.id)
    assert lifecycle.batch_progress(session, batch) == lifecycle.Progress("capturing", 3, 0)
    shard = session.get(BatchShard, started.capture[0])
    assert shard is not None
    shard.status = ShardStatus.DONE
    session.flush()
    assert lifecycle.batch_progress(session, batch) == lifecycle.Progress("capturing", 3, len(shard.fact_ids))


def test_only_starts_whose_worker_died_count_as_deaths_and_the_limit_fails_the_task(session: Session) -> None:
    from qfedit.pipeline import deliveries
    from qfedit.registry import workers

    model = add_model(session)
    batch = submit.submit_batch(session, model=model, fact_ids=add_facts(session, model, 2), requested_by="t")
    workers.heartbeat(session, hostname="b@host", queues=["gpu"], pid=20)
    session.commit()
    task = "capture_shard:1"

    def begin(hostname: str, pid: int) -> int | None:
        return deliveries.begin(session, batch.id, task, hostname=hostname, pid=pid, limit=2, heartbeat_s=10)

    assert begin("a@host", 10) is not None  # a dies in it: never ends
    assert begin("b@host", 20) is not None  # a duplicate that live worker b runs now
    # a came back under another pid (a restart keeps the name): its first start died with it.
    assert deliveries.deaths(session, batch.id, task, hostname="a@host", pid=11, heartbeat_s=10) == 1
    assert begin("a@host", 11) is not None  # dies too
    with pytest.raises(
        deliveries.WorkerDeathsError, match=r"qfedit\.capture_shard \(shard 1\) of batch \d+ started 2"
    ):
        begin("a@host", 12)
    # Another task of the batch has its own count; one that ends is no death.
    start = deliveries.begin(
        session, batch.id, "solve_batch", hostname="a@host", pid=12, limit=1, heartbeat_s=10
    )
    assert start is not None
    deliveries.end(session, batch.id, "solve_batch", start)
    assert (
        deliveries.begin(session, batch.id, "solve_batch", hostname="a@host", pid=13, limit=1, heartbeat_s=10)
        is not None
    )
