"""Edit and retraction batches as records: creation, lookup, their facts.

How a batch moves from status to status is `qfedit.pipeline.lifecycle`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qfedit.db.models import (
    Batch,
    BatchFact,
    BatchKind,
    BatchStatus,
    Model,
    Version,
)
from qfedit.errors import ConflictError, InvalidInputError, NotFoundError
from qfedit.registry.audit import record_audit
from qfedit.registry.base import chunks
from qfedit.registry.facts import facts_of_model


def request_digest(
    model: Model,
    kind: BatchKind,
    fact_ids: Iterable[int] | None,
    hyperparameters: dict[str, Any] | None,
) -> str:
    """What an idempotency key is bound to: sha256 of the request's model, kind, facts (None:
    every pending fact) and hyper-parameters."""
    request = {
        "model": model.id,
        "kind": kind.value,
        "facts": sorted(set(fact_ids)) if fact_ids is not None else "pending",
        "hyperparameters": hyperparameters or {},
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def batch_id_for_key(session: Session, key: str | None) -> int | None:
    """The batch an idempotency key already made, if any (a request that will be answered with it)."""
    if key is None:
        return None
    return session.scalar(select(Batch.id).where(Batch.idempotency_key == key))


def batch_for_key(session: Session, key: str, digest: str, model: Model) -> Batch | None:
    """The batch `key` made, if the request is the one it was made for; a `ConflictError` if not."""
    existing = session.scalar(select(Batch).where(Batch.idempotency_key == key))
    if existing is None or existing.request_digest == digest:
        return existing
    if existing.request_digest is None and existing.model_id == model.id:
        return existing  # made before requests were recorded (revision 0003): matched by model
    raise ConflictError(
        f"idempotency key {key!r} was already used for batch {existing.id}, for another request "
        "(model, kind, facts or hyper-parameters); use a new key for a new request",
        field="header.Idempotency-Key",
    )


def create_batch(
    session: Session,
    *,
    model: Model,
    fact_ids: Iterable[int],
    requested_by: str,
    hyperparameters: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    kind: BatchKind = BatchKind.EDIT,
    reason: str | None = None,
    digest: str | None = None,
) -> Batch:
    """A queued batch of `fact_ids`. With an `idempotency_key`, the same request (`digest`, by
    default that of these arguments) returns the batch the key first made, also when requests
    race; another request with a used key is a `ConflictError`."""
    ids = sorted(set(fact_ids))
    if not ids:
        raise InvalidInputError("a batch needs at least one fact", field="fact_ids")
    digest = digest or request_digest(model, kind, ids, hyperparameters)
    if idempotency_key is not None:
        existing = batch_for_key(session, idempotency_key, digest, model)
        if existing is not None:
            return existing
    facts_of_model(session, model, ids)
    batch = Batch(
        model_id=model.id,
        kind=kind,
        reason=reason,
        hyperparameters=dict(hyperparameters or {}),
        settings=settings,
        idempotency_key=idempotency_key,
        request_digest=digest if idempotency_key is not None else None,
        requested_by=requested_by,
    )
    try:
        with session.begin_nested():
            session.add(batch)
            session.flush()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its batch.
        if idempotency_key is None:
            raise
        winner = batch_for_key(session, idempotency_key, digest, model)
        if winner is None:
            raise
        return winner
    for chunk in chunks(ids):
        session.execute(insert(BatchFact), [{"batch_id": batch.id, "fact_id": fact_id} for fact_id in chunk])
    record_audit(
        session,
        actor=requested_by,
        action="batch.create",
        object_type="batch",
        object_id=batch.id,
        model_id=model.id,
        details={
            "model": model.name,
            "kind": kind.value,
            "facts": len(ids),
            "idempotency_key": idempotency_key,
        },
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
