"""Fact rows: listing, counting, status changes, and the one mapping between a row and the
engine's `qfedit.facts.Fact`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Select, Text, cast, func, or_, select, update
from sqlalchemy.orm import Session, defer

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

SEARCH_CHARS = 1 << 16
"""Text search reads the first this many characters of each field: a fact of megabytes (imported
before facts had size limits) costs a search no more than one at the limits."""
PREVIEW_CHARS = 16000
"""Characters of each text field a list shows (the default `fact_max_context_chars`)."""
PREVIEW_LIST_CHARS = 1 << 16
"""Characters of JSON a list shows of a fact's paraphrases, and of its neighbours."""
_PREVIEW_TEXT = ("question", "answer", "context", "subject")
_PREVIEW_LISTS = ("paraphrases", "neighbors")


def text_match(text: str) -> ColumnElement[bool]:
    """Whether a fact's question, answer, context or subject holds `text`, any case."""
    columns = (FactRow.question, FactRow.answer, FactRow.context, FactRow.subject)
    return or_(
        *(func.substr(c, 1, SEARCH_CHARS, type_=Text).icontains(text, autoescape=True) for c in columns)
    )


def _filtered(
    query: Select[Any],
    model: Model | None,
    status: FactStatus | None,
    source: str | None,
    text: str | None,
) -> Select[Any]:
    if model is not None:
        query = query.where(FactRow.model_id == model.id)
    if status is not None:
        query = query.where(FactRow.status == status)
    if source is not None:
        query = query.where(FactRow.source == source)
    if text:
        query = query.where(text_match(text))
    return query


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
    """Facts by id; `text` matches a substring of the question, answer, context or subject, any
    case (in their first `SEARCH_CHARS` characters)."""
    query = _filtered(select(FactRow), model, status, source, text).order_by(FactRow.id).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def list_fact_ids(
    session: Session,
    *,
    model: Model | None = None,
    status: FactStatus | None = None,
    source: str | None = None,
    text: str | None = None,
    limit: int,
    offset: int = 0,
) -> list[int]:
    """`list_facts`, as ids: what a list reads previews of (`fact_previews`)."""
    query = _filtered(select(FactRow.id), model, status, source, text)
    return list(session.scalars(query.order_by(FactRow.id).offset(offset).limit(limit)))


@dataclass(frozen=True)
class FactPreview:
    """A fact as a list shows it: its text fields cut to a preview's size in the database, so a
    fact of megabytes is never read whole. `row` holds the rest; its text columns are not loaded
    (reading one raises)."""

    row: FactRow
    question: str
    answer: str
    context: str
    subject: str | None
    paraphrases: list[Any]
    neighbors: list[Any]
    cut: tuple[str, ...]
    """The fields cut short; a list too long to show whole is shown empty."""

    @property
    def chars(self) -> int:
        """About how many characters the preview's text holds."""
        lists = sum(len(orjson.dumps(v)) for v in (self.paraphrases, self.neighbors))
        return sum(len(v or "") for v in (self.question, self.answer, self.context, self.subject)) + lists


def fact_previews(
    session: Session, ids: Sequence[int], *, chars: int = PREVIEW_CHARS, list_chars: int = PREVIEW_LIST_CHARS
) -> list[FactPreview]:
    """Previews of the facts `ids`, in that order (ids of no fact are left out)."""
    if not ids:
        return []
    columns = [func.substr(getattr(FactRow, name), 1, chars + 1, type_=Text) for name in _PREVIEW_TEXT]
    columns += [
        func.substr(cast(getattr(FactRow, name), Text), 1, list_chars + 1, type_=Text)
        for name in _PREVIEW_LISTS
    ]
    query = select(FactRow, *columns).options(
        *(defer(getattr(FactRow, name), raiseload=True) for name in (*_PREVIEW_TEXT, *_PREVIEW_LISTS))
    )
    found: dict[int, FactPreview] = {}
    for part in chunks(sorted(set(ids))):
        for row, *values in session.execute(query.where(FactRow.id.in_(part))):
            texts, lists = values[: len(_PREVIEW_TEXT)], values[len(_PREVIEW_TEXT) :]
            cut = [name for name, value in zip(_PREVIEW_TEXT, texts, strict=True) if len(value or "") > chars]
            shown: list[list[Any]] = []
            for name, value in zip(_PREVIEW_LISTS, lists, strict=True):
                if value is not None and len(value) > list_chars:
                    cut.append(name)
                    shown.append([])
                else:
                    shown.append(orjson.loads(value) if value else [])
            question, answer, context, subject = (None if v is None else v[:chars] for v in texts)
            paraphrases, neighbors = shown
            found[row.id] = FactPreview(
                row, question or "", answer or "", context or "", subject, paraphrases, neighbors, tuple(cut)
            )
    return [found[i] for i in ids if i in found]


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
