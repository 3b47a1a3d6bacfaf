"""Paged reads of a model's history: what a page that lists versions, a diff or fact search needs
without loading a whole fact set (a model may hold 100,000 facts and 1,000 versions).

The diff here is `diff_versions`' partition (added, retracted, superseded by an added fact)
computed in SQL, so a page of it costs a page, not two fact sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Select, and_, exists, false, func, or_, select
from sqlalchemy.orm import Session, aliased

from qfedit.db.models import Batch, BatchFact, FactRow, FactStatus, Model, Version, VersionFact
from qfedit.registry.facts import FactPreview, fact_previews, text_match

DiffKind = Literal["added", "retracted", "superseded"]
DIFF_KINDS: tuple[DiffKind, ...] = ("added", "retracted", "superseded")


def versions_page(session: Session, model: Model, *, limit: int, offset: int) -> tuple[list[Version], int]:
    """Newest first, and how many there are."""
    total = session.scalar(select(func.count()).where(Version.model_id == model.id)) or 0
    rows = session.scalars(
        select(Version)
        .where(Version.model_id == model.id)
        .order_by(Version.number.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def metric_series(session: Session, model: Model) -> list[tuple[int, dict[str, Any]]]:
    """Every version's number and metrics, oldest first (what a chart over versions draws)."""
    rows = session.execute(
        select(Version.number, Version.metrics).where(Version.model_id == model.id).order_by(Version.number)
    )
    return [(number, metrics or {}) for number, metrics in rows]


def _only_in(version_id: int, other_id: int | None) -> Select[int]:
    """Fact ids in `version_id`'s set and not in `other_id`'s (all of them when there is no other)."""
    mine = aliased(VersionFact)
    query = select(mine.fact_id).where(mine.version_id == version_id)
    if other_id is not None:
        theirs = aliased(VersionFact)
        query = query.where(~exists().where(theirs.version_id == other_id, theirs.fact_id == mine.fact_id))
    return query


def _diff_query(version: Version, kind: DiffKind) -> Select[FactRow]:
    parent = version.parent_id
    added = _only_in(version.id, parent)
    if kind == "added":
        # Added and not the newer side of a supersession shown under "superseded".
        older = aliased(FactRow)
        replaced = (
            exists().where(older.superseded_by_id == FactRow.id, older.id.in_(_only_in(parent, version.id)))
            if parent is not None
            else None
        )
        query = select(FactRow).where(FactRow.id.in_(added))
        return query.where(~replaced) if replaced is not None else query
    if parent is None:
        return select(FactRow).where(false())
    removed = _only_in(parent, version.id)
    query = select(FactRow).where(FactRow.id.in_(removed))
    by_added = FactRow.superseded_by_id.in_(added)
    if kind == "superseded":
        return query.where(by_added)
    return query.where(or_(FactRow.superseded_by_id.is_(None), ~by_added))


def diff_counts(session: Session, version: Version) -> dict[DiffKind, int]:
    """How many facts `version` added, retracted and superseded against its parent."""
    return {
        kind: session.scalar(select(func.count()).select_from(_diff_query(version, kind).subquery())) or 0
        for kind in DIFF_KINDS
    }


@dataclass(frozen=True)
class DiffRow:
    fact: FactRow
    replaced_by: FactRow | None = None  # for a superseded fact: the newer fact that took its place


def diff_page(
    session: Session, version: Version, kind: DiffKind, *, limit: int, offset: int
) -> list[DiffRow]:
    """One page of the facts `version` added, retracted or superseded against its parent, by id."""
    rows = list(session.scalars(_diff_query(version, kind).order_by(FactRow.id).limit(limit).offset(offset)))
    if kind != "superseded":
        return [DiffRow(row) for row in rows]
    newer = {
        row.id: row
        for row in session.scalars(select(FactRow).where(FactRow.id.in_([r.superseded_by_id for r in rows])))
    }
    return [DiffRow(row, newer.get(row.superseded_by_id or -1)) for row in rows]


def search_facts(
    session: Session, text: str, *, model: Model | None = None, limit: int, offset: int, chars: int
) -> tuple[list[FactPreview], bool]:
    """Facts whose id or external id is `text`, or whose question, answer, context or subject
    holds it (any case, in their first `SEARCH_CHARS` characters); by id, each field cut to
    `chars`. Also whether there is a next page."""
    text = text.strip()
    matches = [text_match(text), FactRow.external_id == text]
    if text.isdigit() and len(text) < 19:
        matches.append(FactRow.id == int(text))
    query = select(FactRow.id).where(or_(*matches))
    if model is not None:
        query = query.where(FactRow.model_id == model.id)
    ids = list(session.scalars(query.order_by(FactRow.id).limit(limit + 1).offset(offset)))
    return fact_previews(session, ids[:limit], chars=chars), len(ids) > limit


def version_ranges(session: Session, fact: FactRow) -> list[tuple[int, int]]:
    """The versions whose fact set holds `fact`, as runs of consecutive numbers (first, last)."""
    numbers = session.scalars(
        select(Version.number)
        .join(VersionFact, VersionFact.version_id == Version.id)
        .where(VersionFact.fact_id == fact.id)
        .order_by(Version.number)
    )
    runs: list[tuple[int, int]] = []
    for number in numbers:
        if runs and runs[-1][1] == number - 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs


def fact_batches(session: Session, fact: FactRow) -> list[Batch]:
    return list(
        session.scalars(
            select(Batch)
            .join(BatchFact, BatchFact.batch_id == Batch.id)
            .where(BatchFact.fact_id == fact.id)
            .order_by(Batch.id)
        )
    )


def status_counts(session: Session, model: Model) -> dict[str, int]:
    rows = session.execute(
        select(FactRow.status, func.count()).where(FactRow.model_id == model.id).group_by(FactRow.status)
    )
    counts = {status.value: 0 for status in FactStatus}
    counts.update({status.value: count for status, count in rows})
    return counts


def recent_batches(session: Session, model: Model, *, limit: int) -> list[Batch]:
    return list(
        session.scalars(
            select(Batch).where(Batch.model_id == model.id).order_by(Batch.id.desc()).limit(limit)
        )
    )


def latest_versions(session: Session, models: Sequence[Model]) -> dict[int, Version]:
    """Each model's newest version (its head), in one query."""
    newest = (
        select(Version.model_id, func.max(Version.number).label("number"))
        .where(Version.model_id.in_([m.id for m in models]))
        .group_by(Version.model_id)
        .subquery()
    )
    rows = session.scalars(
        select(Version).join(
            newest, and_(Version.model_id == newest.c.model_id, Version.number == newest.c.number)
        )
    )
    return {v.model_id: v for v in rows}
