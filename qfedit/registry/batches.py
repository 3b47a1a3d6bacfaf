"""Edit and retraction batches as records: creation, lookup, their facts.

How a batch moves from status to status is `qfedit.pipeline.lifecycle`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from qfedit.db.models import (
    Batch,
    BatchFact,
    BatchStatus,
    Model,
    Version,
)
from qfedit.errors import ConflictError, InvalidInputError, NotFoundError
from qfedit.registry.audit import record_audit
from qfedit.registry.base import chunks
from qfedit.registry.facts import facts_of_model


def create_batch(
    session: Session,
    *,
    model: Model,
    fact_ids: Iterable[int],
    requested_by: str,
    hyperparameters: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Batch:
    """A queued batch of `fact_ids`; the same `idempotency_key` returns the batch it first made."""
    ids = sorted(set(fact_ids))
    if not ids:
        raise InvalidInputError("a batch needs at least one fact")
    if idempotency_key is not None:
        existing = session.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.model_id != model.id or batch_fact_ids(session, existing) != ids:
                raise ConflictError(
                    f"idempotency key {idempotency_key!r} was already used for batch {existing.id} "
                    "with a different model or fact set"
                )
            return existing
    facts_of_model(session, model, ids)
    batch = Batch(
        model_id=model.id,
        hyperparameters=dict(hyperparameters or {}),
        idempotency_key=idempotency_key,
        requested_by=requested_by,
    )
    session.add(batch)
    session.flush()
    for chunk in chunks(ids):
        session.execute(insert(BatchFact), [{"batch_id": batch.id, "fact_id": fact_id} for fact_id in chunk])
    record_audit(
        session,
        actor=requested_by,
        action="batch.create",
        object_type="batch",
        object_id=batch.id,
        details={"model": model.name, "facts": len(ids), "idempotency_key": idempotency_key},
    )
    return batch


def get_batch(session: Session, batch_id: int, *, for_update: bool = False) -> Batch:
    query = select(Batch).where(Batch.id == batch_id)
    if for_update:
        # Row lock on PostgreSQL, so two deliveries of a task cannot both advance one batch.
        query = query.with_for_update()
    batch = session.scalar(query)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}")
    return batch


def list_batches(
    session: Session,
    *,
    model: Model | None = None,
    status: BatchStatus | None = None,
    limit: int | None = 100,
    offset: int = 0,
) -> list[Batch]:
    """Newest first."""
    query = select(Batch).order_by(Batch.id.desc()).offset(offset)
    if model is not None:
        query = query.where(Batch.model_id == model.id)
    if status is not None:
        query = query.where(Batch.status == status)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def batch_fact_count(session: Session, batch: Batch) -> int:
    return session.scalar(select(func.count()).where(BatchFact.batch_id == batch.id)) or 0


def version_of_batch(session: Session, batch: Batch) -> Version | None:
    """The version a batch published, if it has."""
    return session.scalar(select(Version).where(Version.batch_id == batch.id).limit(1))


def batch_fact_ids(session: Session, batch: Batch) -> list[int]:
    return list(
        session.scalars(
            select(BatchFact.fact_id).where(BatchFact.batch_id == batch.id).order_by(BatchFact.fact_id)
        )
    )
