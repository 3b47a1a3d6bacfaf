"""Write paths under concurrency and misuse: idempotency keys bound to their request, version
numbers under racing writers, write-once rows that no SQL statement can replace."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.db import Batch, BatchKind, Version, session_factory
from qfedit.errors import ConflictError
from qfedit.pipeline import submit

from .helpers import add_facts, add_model

T = TypeVar("T")


def _in_threads(count: int, work: Callable[[Session], T], engine: Engine) -> list[T | BaseException]:
    """`work` in `count` threads at once, each in a session of its own that it commits."""
    sessions = session_factory(engine)
    start = threading.Barrier(count)
    results: list[T | BaseException] = [RuntimeError("not run")] * count

    def run(index: int) -> None:
        with sessions() as session:
            start.wait()
            try:
                results[index] = work(session)
                session.commit()
            except BaseException as error:  # reported to the test, which names it
                session.rollback()
                results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_requests_with_one_key_get_one_batch(engine: Engine, session: Session) -> None:
    model = add_model(session)
    ids = add_facts(session, model, 3)
    session.commit()

    def post(db: Session) -> int:
        row = registry.get_model(db, "tiny")
        batch = submit.submit_batch(
            db,
            model=row,
            fact_ids=ids,
            requested_by="w",
            idempotency_key="k1",
            hyperparameters={"solve": {"lam": 2}},
        )
        db.flush()
        return batch.id

    results = _in_threads(8, post, engine)
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1
    assert session.scalar(select(func.count()).select_from(Batch)) == 1


def test_a_used_key_with_another_request_is_a_conflict_naming_the_key(session: Session) -> None:
    model = add_model(session)
    other = add_model(session, "other")
    ids = add_facts(session, model, 3)
    other_ids = add_facts(session, other, 1, start=10)
    first = submit.submit_batch(
        session,
        model=model,
        fact_ids=ids,
        requested_by="w",
        idempotency_key="k",
        hyperparameters={"solve": {"lam": 2}},
    )
    again = submit.submit_batch(
        session,
        model=model,
        fact_ids=ids,
        requested_by="w",
        idempotency_key="k",
        hyperparameters={"solve": {"lam": 2}},
    )
    assert again.id == first.id
    attempts = [
        lambda: submit.submit_batch(
            session, model=model, fact_ids=ids[:2], requested_by="w", idempotency_key="k"
        ),
        lambda: submit.submit_batch(
            session,
            model=model,
            fact_ids=ids,
            requested_by="w",
            idempotency_key="k",
            hyperparameters={"solve": {"lam": 9}},
        ),
        lambda: submit.submit_batch(
            session, model=other, fact_ids=other_ids, requested_by="w", idempotency_key="k"
        ),
        lambda: submit.submit_retraction(
            session, model=model, fact_ids=ids, reason="oops", requested_by="w", idempotency_key="k"
        ),
    ]
    for attempt in attempts:
        with pytest.raises(ConflictError, match="idempotency key 'k' was already used for batch") as refused:
            attempt()
        assert refused.value.field == "header.Idempotency-Key"
    session.refresh(first)
    assert (first.kind, first.reason, first.hyperparameters) == (BatchKind.EDIT, None, {"solve": {"lam": 2}})
    assert session.scalar(select(func.count()).select_from(Batch)) == 1


def test_concurrent_writers_take_the_next_version_numbers(engine: Engine, session: Session) -> None:
    model = add_model(session)
    ids = add_facts(session, model, 12)
    session.commit()

    def record(index: int) -> Callable[[Session], int]:
        def work(db: Session) -> int:
            row = registry.get_model(db, "tiny")
            version = registry.record_version(
                db,
                model=row,
                fact_ids=ids[: index + 1],
                created_by="t",
                reason="r",
                checkpoint=None,
                layer=1,
                rule="seed",
            )
            return version.number

        return work

    counter = iter(range(12))
    lock = threading.Lock()

    def any_writer(db: Session) -> int:
        with lock:
            index = next(counter)
        return record(index)(db)

    results = _in_threads(12, any_writer, engine)
    assert all(isinstance(r, int) for r in results), results
    assert sorted(results) == list(range(1, 13))  # type: ignore[type-var]
    assert session.scalar(select(func.count()).select_from(Version)) == 13  # with version 0


@pytest.mark.backends("sqlite")
def test_sqlite_refuses_to_replace_write_once_rows(session: Session) -> None:
    model = add_model(session)
    ids = add_facts(session, model, 1)
    version = registry.record_version(
        session,
        model=model,
        fact_ids=ids,
        created_by="alice",
        reason="r",
        checkpoint=None,
        layer=1,
        rule="seed",
    )
    session.commit()
    entry = registry.list_audit(session, limit=1)[0]
    statements = [
        f"INSERT OR REPLACE INTO audit_log (id, at, actor, action, object_type, object_id, details) "
        f"VALUES ({entry.id}, '2020-01-01', 'mallory', 'x', 'x', 'x', '{{}}')",
        f"REPLACE INTO versions (id, model_id, number, fact_set_digest, fact_count, created_at, created_by, "
        f"reason, hyperparameters, metrics) VALUES ({version.id}, {model.id}, 99, 'd', 0, '2020-01-01', "
        "'mallory', 'r', '{}', '{}')",
        f"INSERT OR REPLACE INTO versions (model_id, number, fact_set_digest, fact_count, created_at, "
        f"created_by, reason, hyperparameters, metrics) VALUES ({model.id}, {version.number}, 'd', 0, "
        "'2020-01-01', 'mallory', 'r', '{}', '{}')",
        f"INSERT OR REPLACE INTO version_facts (version_id, fact_id) VALUES ({version.id}, {ids[0]})",
    ]
    for statement in statements:
        with pytest.raises(DatabaseError, match="immutable"):
            session.execute(text(statement))
        session.rollback()
    session.expire_all()
    assert registry.list_audit(session, limit=1)[0].actor == entry.actor
    assert registry.get_version(session, f"tiny@{version.number}").created_by == "alice"
