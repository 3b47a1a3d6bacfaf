"""Supersession: a fact that states a new answer to a question the model line already has.

Rule: two facts of one model are about the same thing when their questions normalise alike
(`qfedit.facts.question_key`: case, spacing and closing punctuation aside) or when both carry
the same external `id`. The question, not a subject, is the key because a fact has no relation
field: the question names both the subject and what is asked of it, and subjects are optional.

When the newest such fact is pending, every older one is superseded by it: an older pending fact
is retracted at once (no version holds it); an older applied fact stays in the versions that have
it until the batch that adds the new fact publishes, which solves without it (the same statistics
subtraction as a retraction) and retracts it. Linking is idempotent: importing a corpus twice
changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qfedit.db.models import FactRow, FactStatus
from qfedit.registry.audit import record_audit
from qfedit.registry.base import ID_CHUNK, chunks, equals_any

_ACTIVE = (FactStatus.PENDING, FactStatus.APPLIED)


def _shared(session: Session, model_id: int, column: Any, values: Sequence[str]) -> list[str]:
    """The values more than one fact of the model has: only those can supersede anything, and in
    most import chunks there are none, so the chunk's rows are not loaded at all."""
    postgres = session.get_bind().dialect.name == "postgresql"
    shared: list[str] = []
    for start in range(0, len(values), ID_CHUNK):
        part = values[start : start + ID_CHUNK]
        # PostgreSQL: one array, and the key alone in the condition. With `IN (...)` and the status
        # in the query, the generic plan of the prepared statement scanned the (model_id, status)
        # index and compared every fact of the model with every key: ~1 s a chunk, and import fell
        # to ~600 facts/s at 50,000 facts.
        matches = equals_any(column, part, "keys") if postgres else column.in_(part)
        query = (
            select(column)
            .where(FactRow.model_id == model_id, matches)
            .group_by(column)
            .having(func.count() > 1)
        )
        shared += [str(value) for value in session.scalars(query)]
    return shared


def _active(session: Session, model_id: int, column: Any, values: Sequence[str]) -> list[FactRow]:
    rows: list[FactRow] = []
    for start in range(0, len(values), ID_CHUNK):
        part = values[start : start + ID_CHUNK]
        found = session.scalars(select(FactRow).where(FactRow.model_id == model_id, column.in_(part)))
        rows += [row for row in found if row.status in _ACTIVE]
    return rows


def link(
    session: Session, model_id: int, *, question_keys: Iterable[str], external_ids: Iterable[str], actor: str
) -> list[tuple[int, int]]:
    """Mark what the newest pending fact of each question (or external id) supersedes; returns the
    `(older, newer)` pairs that changed. The caller commits."""
    changed: list[tuple[int, int]] = []
    for column, values in (
        (FactRow.question_key, sorted(set(question_keys))),
        (FactRow.external_id, sorted({v for v in external_ids if v})),
    ):
        groups: dict[str, list[FactRow]] = {}
        # The query autoflushes: a row the first pass retracted is not active in the second.
        for row in _active(session, model_id, column, _shared(session, model_id, column, values)):
            groups.setdefault(str(getattr(row, column.key)), []).append(row)  # type: ignore[attr-defined]
        for rows in groups.values():
            rows.sort(key=lambda r: r.id)
            newest = rows[-1]
            if newest.status != FactStatus.PENDING:
                continue
            for older in rows[:-1]:
                if older.superseded_by_id == newest.id:
                    continue
                older.superseded_by_id = newest.id
                if older.status == FactStatus.PENDING:
                    older.status = FactStatus.RETRACTED
                changed.append((older.id, newest.id))
    # One entry per superseded fact, about that fact: the log is searched by fact id, and ids
    # joined into one `object_id` overflowed its 64 characters (PostgreSQL refused the import).
    for old, new in changed:
        record_audit(
            session,
            actor=actor,
            action="fact.superseded",
            object_type="fact",
            object_id=old,
            model_id=model_id,
            details={"superseded_by": new},
        )
    return changed


def superseded_by(session: Session, fact_ids: Iterable[int], among: Iterable[int]) -> dict[int, int]:
    """`{older: newer}` for the facts in `among` that a fact of `fact_ids` supersedes."""
    new = sorted(set(fact_ids))
    pool = set(among)
    found: dict[int, int] = {}
    for part in chunks(new):
        for old_id, new_id in session.execute(
            select(FactRow.id, FactRow.superseded_by_id).where(FactRow.superseded_by_id.in_(part))
        ):
            if old_id in pool and new_id is not None:
                found[old_id] = int(new_id)
    return found
