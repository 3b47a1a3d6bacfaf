"""Fact rows: listing, counting, status changes, and the one mapping between a row and the
engine's `qfedit.facts.Fact`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from qfedit.db.models import (
    FactRow,
    FactStatus,
    Model,
    utcnow,
)
from qfedit.errors import NotFoundError
from qfedit.facts import Fact, Neighbor
from qfedit.registry.audit import record_audit
from qfedit.registry.base import chunks


def list_facts(
    session: Session,
    *,
    model: Model | None = None,
    status: FactStatus | None = None,
    source: str | None = None,
    text: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[FactRow]:
    """Facts by id; `text` matches a substring of the question, answer, context or subject, any case."""
    query = select(FactRow).order_by(FactRow.id).offset(offset)
    if model is not None:
        query = query.where(FactRow.model_id == model.id)
    if status is not None:
        query = query.where(FactRow.status == status)
    if source is not None:
        query = query.where(FactRow.source == source)
    if text:
        columns = (FactRow.question, FactRow.answer, FactRow.context, FactRow.subject)
        query = query.where(or_(*(column.icontains(text, autoescape=True) for column in columns)))
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def count_facts(session: Session, *, model: Model | None = None) -> dict[str, int]:
    query = select(FactRow.status, func.count()).group_by(FactRow.status)
    if model is not None:
        query = query.where(FactRow.model_id == model.id)
    return {status.value: count for status, count in session.execute(query)}


def facts_of_model(session: Session, model: Model, fact_ids: Iterable[int]) -> dict[int, str]:
    """id -> content hash for `fact_ids`, all of which must be facts of `model`."""
    wanted = sorted(set(fact_ids))
    found: dict[int, str] = {}
    for chunk in chunks(wanted):
        rows = session.execute(
            select(FactRow.id, FactRow.content_hash).where(
                FactRow.model_id == model.id, FactRow.id.in_(chunk)
            )
        )
        # Not `found.update(rows)`: a Result has `keys()`, so dict.update would read it as a mapping.
        found.update(list(rows))
    missing = [fact_id for fact_id in wanted if fact_id not in found]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise NotFoundError(f"facts not found for model {model.name!r}: {shown}")
    return found


def set_fact_status(
    session: Session, fact_ids: Iterable[int], status: FactStatus, *, actor: str, reason: str
) -> int:
    ids = sorted(set(fact_ids))
    changed = 0
    for chunk in chunks(ids):
        result = session.execute(
            update(FactRow).where(FactRow.id.in_(chunk), FactRow.status != status).values(status=status),
            execution_options={"synchronize_session": "fetch"},
        )
        changed += result.rowcount  # type: ignore[attr-defined]
    record_audit(
        session,
        actor=actor,
        action="fact.status",
        object_type="fact",
        object_id=",".join(map(str, ids[:20])) + ("..." if len(ids) > 20 else ""),
        model_id=session.scalar(select(FactRow.model_id).where(FactRow.id == ids[0])) if ids else None,
        details={"status": status.value, "count": len(ids), "changed": changed, "reason": reason},
    )
    return changed


def get_fact(session: Session, fact_id: int) -> FactRow:
    fact = session.get(FactRow, fact_id)
    if fact is None:
        raise NotFoundError(f"no fact {fact_id}")
    return fact


def load_facts(session: Session, ids: Iterable[int]) -> list[FactRow]:
    wanted = sorted(ids)
    found: list[FactRow] = []
    for chunk in chunks(wanted):
        found.extend(session.scalars(select(FactRow).where(FactRow.id.in_(chunk)).order_by(FactRow.id)))
    return found


# -- the one mapping between a row and the engine's record ------------------------------------


def to_record(row: FactRow) -> Fact:
    """The engine's view of a stored fact; its `id` is the row id, so errors name the row."""
    return Fact(
        question=row.question,
        answer=row.answer,
        context=row.context,
        id=str(row.id),
        subject=row.subject,
        significance=tuple(row.significance) if row.significance is not None else None,
        paraphrases=tuple(row.paraphrases or ()),
        neighbors=tuple(Neighbor.model_validate(n) for n in row.neighbors or ()),
    )


def row_values(
    model_id: int, fact: Fact, *, source: str, line: int | None, created_at: datetime | None = None
) -> dict[str, Any]:
    """Column values of a new pending row holding `fact` (an insert's parameters); `created_at`
    defaults to now."""
    return {
        "model_id": model_id,
        "content_hash": fact.content_hash(),
        "question_key": fact.question_key(),
        "external_id": fact.id,
        "question": fact.question,
        "answer": fact.answer,
        "context": fact.context,
        "subject": fact.subject,
        "significance": list(fact.significance) if fact.significance is not None else None,
        "paraphrases": list(fact.paraphrases),
        "neighbors": [n.model_dump() for n in fact.neighbors],
        "source": source,
        "source_line": line,
        "status": FactStatus.PENDING,
        "created_at": created_at or utcnow(),
    }
