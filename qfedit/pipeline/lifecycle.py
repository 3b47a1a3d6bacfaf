"""A batch's lifecycle in one place: its statuses, the moves between them, and its progress.

    queued -> capturing -> solving -> evaluating -> published
       \\_________\\____________\\___________\\______> failed (-> queued: a retry) | cancelled

Moves that several deliveries of a task may race for (capturing -> solving, taking and releasing
the model's line) are conditional updates that exactly one caller wins; the others are plain,
checked transitions under a row lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from qfedit.db.models import Batch, BatchKind, BatchShard, BatchStatus, Model, ShardStatus, utcnow
from qfedit.errors import ConflictError, InvalidInputError
from qfedit.registry.audit import record_audit
from qfedit.registry.batches import batch_fact_count

SYSTEM = "qfedit-worker"
FINAL = frozenset({BatchStatus.PUBLISHED, BatchStatus.FAILED, BatchStatus.CANCELLED})
ACTIVE = frozenset({BatchStatus.QUEUED, BatchStatus.CAPTURING, BatchStatus.SOLVING, BatchStatus.EVALUATING})
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.QUEUED: frozenset({BatchStatus.CAPTURING, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    BatchStatus.CAPTURING: frozenset({BatchStatus.SOLVING, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    BatchStatus.SOLVING: frozenset({BatchStatus.EVALUATING, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    BatchStatus.EVALUATING: frozenset({BatchStatus.PUBLISHED, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    # A failed batch may be queued again (a retry); published and cancelled are final.
    BatchStatus.FAILED: frozenset({BatchStatus.QUEUED}),
    BatchStatus.PUBLISHED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}


class InvalidTransitionError(ConflictError):
    """A batch status change the lifecycle does not allow."""


def transition_batch(
    session: Session,
    batch: Batch,
    status: BatchStatus,
    *,
    actor: str,
    error: str | None = None,
    progress: float | None = None,
) -> Batch:
    """Move a batch along its lifecycle; re-entering the current status is a no-op (redelivered tasks)."""
    if status == batch.status:
        if progress is not None:
            set_progress(batch, progress)
        return batch
    if status not in TRANSITIONS[batch.status]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[batch.status])) or "none (final)"
        raise InvalidTransitionError(
            f"batch {batch.id}: cannot go from {batch.status.value} to {status.value} (allowed: {allowed})"
        )
    previous = batch.status
    batch.status = status
    batch.waiting = None  # a wait belongs to the stage it was in (or to a worker that died in it)
    batch.activity = None
    now = utcnow()
    if status == BatchStatus.CAPTURING:
        batch.attempts += 1
        batch.started_at = batch.started_at or now
    if status == BatchStatus.QUEUED:
        batch.error = None
        batch.progress = 0.0
    if status in FINAL:
        batch.finished_at = now
    if status == BatchStatus.PUBLISHED:
        batch.progress = 1.0
    if error is not None:
        batch.error = error
    if progress is not None:
        set_progress(batch, progress)
    record_audit(
        session,
        actor=actor,
        action="batch.status",
        object_type="batch",
        object_id=batch.id,
        model_id=batch.model_id,
        details={"from": previous.value, "to": status.value, **({"error": error} if error else {})},
    )
    return batch


def set_progress(batch: Batch, progress: float) -> None:
    if not 0.0 <= progress <= 1.0:
        raise InvalidInputError(f"progress must be between 0 and 1, not {progress}", field="progress")
    batch.progress = progress


def set_waiting(session: Session, batch_id: int, waiting: str | None) -> None:
    """Say what a task of an active batch is waiting for, or (None) that it waits no longer. Also
    the batch's last change: one that waits is not a lost message for beat to send again."""
    _note_active(session, batch_id, waiting=waiting)


def _note_active(session: Session, batch_id: int, **values: str | None) -> None:
    # Only while the batch is active, and as its last change (what beat's stall scan reads).
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(ACTIVE))
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def elapsed_s(batch: Batch) -> float:
    """Seconds from the batch's submission to its end, or to now while it runs: the database's
    clock, so every reader (a later `watch`, the API) sees the same figure."""
    end = batch.finished_at or utcnow()
    return max(0.0, (end - batch.created_at).total_seconds())


def set_activity(session: Session, batch_id: int, activity: str | None) -> None:
    """Say what an active batch's task is doing within its status; also its last change (a batch
    that reports work is not a lost message for beat to send again)."""
    _note_active(session, batch_id, activity=activity)


def take_line(session: Session, batch: Batch) -> bool:
    """Make `batch` the one that holds its model's line; false if another batch holds it."""
    taken = session.execute(
        update(Model)
        .where(Model.id == batch.model_id)
        .where((Model.active_batch_id.is_(None)) | (Model.active_batch_id == batch.id))
        .values(active_batch_id=batch.id)
    )
    return bool(taken.rowcount)  # type: ignore[attr-defined]


def release_line(session: Session, batch: Batch) -> None:
    session.execute(
        update(Model)
        .where(Model.id == batch.model_id, Model.active_batch_id == batch.id)
        .values(active_batch_id=None)
    )


def advance_to_solving(session: Session, batch_id: int) -> bool:
    """Move a capturing batch to solving iff no shard is pending; true for exactly one caller."""
    pending = exists().where(BatchShard.batch_id == batch_id, BatchShard.status == ShardStatus.PENDING)
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.CAPTURING, ~pending)
        .values(status=BatchStatus.SOLVING, progress=1.0, waiting=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    record_audit(
        session,
        actor=SYSTEM,
        action="batch.status",
        object_type="batch",
        object_id=batch_id,
        model_id=session.scalar(select(Batch.model_id).where(Batch.id == batch_id)),
        details={"from": BatchStatus.CAPTURING.value, "to": BatchStatus.SOLVING.value},
    )
    return True


def cancel_batch(session: Session, batch: Batch, *, actor: str) -> Batch:
    """Cancel a batch that has not published; its facts stay as they were."""
    transition_batch(session, batch, BatchStatus.CANCELLED, actor=actor)
    release_line(session, batch)
    return batch


def fail_batch(session: Session, batch: Batch, error: str, *, actor: str = SYSTEM) -> Batch:
    if batch.status not in FINAL:
        transition_batch(session, batch, BatchStatus.FAILED, actor=actor, error=error[:4000])
    release_line(session, batch)
    return batch


def stalled_batches(session: Session, older_than_s: float) -> list[int]:
    """Batches in flight whose last change is older than `older_than_s`: a lost message to resend."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(session.scalars(select(Batch.id).where(Batch.status.in_(ACTIVE), Batch.updated_at < cutoff)))


@dataclass(frozen=True)
class Progress:
    stage: str
    facts: int
    captured: int
    """Facts of the batch whose observations are stored (captured now or by an earlier batch)."""


def batch_progress(session: Session, batch: Batch) -> Progress:
    facts = batch_fact_count(session, batch)
    shards = list(session.scalars(select(BatchShard).where(BatchShard.batch_id == batch.id)))
    to_capture = sum(len(shard.fact_ids) for shard in shards)
    done = sum(len(shard.fact_ids) for shard in shards if shard.status == ShardStatus.DONE)
    if batch.status == BatchStatus.QUEUED:
        captured = 0
    else:
        captured = facts - to_capture + done if batch.kind == BatchKind.EDIT else facts
    return Progress(batch.status.value, facts, captured)


def finish_shard(session: Session, shard_id: int, batch_id: int) -> None:
    """Mark a shard captured (once) and the batch's progress as the share of its shards done."""
    session.execute(
        update(BatchShard)
        .where(BatchShard.id == shard_id, BatchShard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.DONE)
        .execution_options(synchronize_session=False)
    )
    total = session.scalar(select(func.count()).where(BatchShard.batch_id == batch_id)) or 1
    done = session.scalar(
        select(func.count()).where(BatchShard.batch_id == batch_id, BatchShard.status == ShardStatus.DONE)
    )
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.CAPTURING)
        .values(progress=min(1.0, (done or 0) / total))
        .execution_options(synchronize_session=False)
    )
