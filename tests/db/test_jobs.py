"""The batch steps' database logic, without workers: hyper-parameters, the model line, shards."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from qfedit import jobs
from qfedit.db import BatchStatus

from .helpers import add_facts, add_model


def test_batch_hyperparameters_override_model_settings_and_typos_are_refused(session: Session) -> None:
    model = add_model(session)
    model.settings = {"layer": 2, "solve": {"rule": "seed"}}
    ids = add_facts(session, model, 3)
    with pytest.raises(ValueError, match=r"batch: field 'hyperparameters.solve.lamb'"):
        jobs.submit_batch(
            session, model=model, fact_ids=ids, requested_by="t", hyperparameters={"solve": {"lamb": 1}}
        )
    batch = jobs.submit_batch(
        session, model=model, fact_ids=ids, requested_by="t", hyperparameters={"solve": {"lam": 7}}
    )
    settings = jobs.batch_settings(batch)
    assert (settings.layer, settings.solve.rule, settings.solve.lam) == (2, "seed", 7.0)


def test_one_batch_holds_a_model_line_and_shards_cover_its_facts(session: Session) -> None:
    model = add_model(session)
    model.settings = {"layer": 1, "shard_size": 2}
    ids = add_facts(session, model, 5)
    first = jobs.submit_batch(session, model=model, fact_ids=ids[:3], requested_by="t")
    second = jobs.submit_batch(session, model=model, fact_ids=ids[3:], requested_by="t")
    session.commit()

    started = jobs.start_batch(session, first.id)
    assert len(started.capture) == 2 and not started.wait  # 3 facts in shards of 2
    assert jobs.start_batch(session, second.id).wait  # the line is held
    again = jobs.start_batch(session, first.id)  # a redelivered start resends the same shards
    assert sorted(again.capture) == sorted(started.capture)
    session.refresh(first)
    assert first.status == BatchStatus.CAPTURING and first.parent_version_id is not None

    jobs.cancel_batch(session, first, actor="t")
    session.commit()
    assert not jobs.start_batch(session, second.id).wait  # released by the cancel


def test_pending_means_every_pending_fact_and_none_is_an_error(session: Session) -> None:
    model = add_model(session)
    with pytest.raises(ValueError, match="no pending facts"):
        jobs.submit_batch(session, model=model, fact_ids=None, requested_by="t")
    ids = add_facts(session, model, 4)
    batch = jobs.submit_batch(
        session, model=model, fact_ids=None, requested_by="t", idempotency_key="nightly:x"
    )
    from qfedit import repository

    assert repository.batch_fact_ids(session, batch) == ids
    assert (
        jobs.submit_batch(
            session, model=model, fact_ids=None, requested_by="t", idempotency_key="nightly:x"
        ).id
        == batch.id
    )


def test_progress_counts_captured_facts(session: Session) -> None:
    from qfedit.db import BatchShard, ShardStatus

    model = add_model(session)
    model.settings = {"layer": 1, "shard_size": 2}
    batch = jobs.submit_batch(session, model=model, fact_ids=add_facts(session, model, 3), requested_by="t")
    session.commit()
    assert jobs.batch_progress(session, batch) == jobs.Progress("queued", 3, 0)
    started = jobs.start_batch(session, batch.id)
    assert jobs.batch_progress(session, batch) == jobs.Progress("capturing", 3, 0)
    shard = session.get(BatchShard, started.capture[0])
    assert shard is not None
    shard.status = ShardStatus.DONE
    session.flush()
    assert jobs.batch_progress(session, batch) == jobs.Progress("capturing", 3, len(shard.fact_ids))
