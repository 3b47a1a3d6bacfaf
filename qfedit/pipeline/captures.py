"""Captured observations in the store, and the records that say where each fact's are.

A capture task writes one observation file per shard (keys, errors, weights and fact ids, in
float32 where the engine keeps float32 values) and records, per fact, the file that holds its
rows at `(layer, base fingerprint)`. Captures outlive batches: a fact captured once at a layer
is never captured there again, and a retraction reads its rows back to subtract them.

This module is the records, read by views without torch; the files are `observations`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit.db.models import FactCapture
from qfedit.registry.base import chunks
from qfedit.store import StoredObject

if TYPE_CHECKING:
    from qfedit.teachable import Reading

REFUSED = ""
"""The `object_path` of a fact refused before capture (too large for the model): no observations.
Its record keeps it out of later batches as an unteachable fact's does; `teachable` is False."""
READINGS_ONLY = "(readings only)"
"""The `object_path` of a fact a spread batch captured: what the model answers with the fact in
context and without it, and no observations (a spread's solve recaptures every layer's keys itself,
with the lower layers' edits applied). A single-layer batch at that layer captures it again and
fills the record in."""
UNTEACHABLE = "unteachable: with the fact as its system message the model answers otherwise"
TOO_LARGE = (
    "refused before capture: longer than the model's context or the fact size limits "
    "(the audit log's facts.refused entry has the numbers)"
)


def find_captures(
    session: Session, fact_ids: Iterable[int], layer: int, fingerprint: str
) -> list[FactCapture]:
    """The capture records of `fact_ids` at `layer` of the base weights `fingerprint`."""
    found: list[FactCapture] = []
    # In chunks: one IN list of a whole fact set would pass PostgreSQL's 65,535 parameters.
    for part in chunks(sorted(set(fact_ids))):
        found += session.scalars(
            select(FactCapture).where(
                FactCapture.fact_id.in_(part),
                FactCapture.layer == layer,
                FactCapture.fingerprint == fingerprint,
            )
        )
    return found


def captured_fact_ids(
    session: Session, fact_ids: Iterable[int], layer: int, fingerprint: str, *, observations: bool = True
) -> set[int]:
    """The facts captured at `layer`; with `observations=False`, also those whose record holds
    their readings alone (`READINGS_ONLY`), which is all a spread batch needs."""
    return {
        capture.fact_id
        for capture in find_captures(session, fact_ids, layer, fingerprint)
        if not observations or capture.object_path != READINGS_ONLY
    }


def record_captures(
    session: Session,
    stored: StoredObject,
    positions: dict[int, int],
    layer: int,
    fingerprint: str,
    readings: dict[int, Reading] | None = None,
) -> None:
    """Record that `stored` holds the rows of each fact in `positions` (fact id -> row count),
    and what the model answers with each fact in context (`readings`), for the facts not already
    recorded (a redelivered task records nothing twice); a readings-only record gains the rows."""
    known = {c.fact_id: c for c in find_captures(session, positions, layer, fingerprint)}
    for fact_id, count in positions.items():
        had = known.get(fact_id)
        if had is not None and had.object_path == READINGS_ONLY:
            had.object_path, had.object_sha256, had.positions = stored.path, stored.sha256, count
        elif had is None:
            reading = (readings or {}).get(fact_id)
            session.add(
                FactCapture(
                    fact_id=fact_id,
                    layer=layer,
                    fingerprint=fingerprint,
                    object_path=stored.path,
                    object_sha256=stored.sha256,
                    positions=count,
                    context_answer=reading.context_answer if reading is not None else None,
                    teachable=reading.teachable if reading is not None else None,
                    base_answer=reading.base_answer if reading is not None else None,
                )
            )


def record_readings(session: Session, readings: dict[int, Reading], layer: int, fingerprint: str) -> None:
    """Record what the model answers to each fact (`readings`, by fact id), for a spread batch that
    needs no observations (`READINGS_ONLY`); a redelivered task records nothing twice."""
    _record_without_observations(session, dict(readings), layer, fingerprint, READINGS_ONLY)


def record_refused(session: Session, refused: Iterable[int], layer: int, fingerprint: str) -> None:
    """Record that the facts `refused` cannot be captured at all (too large for the model), so
    that no batch captures them again; a redelivered task records nothing twice."""
    _record_without_observations(session, dict.fromkeys(sorted(set(refused))), layer, fingerprint, REFUSED)


def _record_without_observations(
    session: Session, facts: dict[int, Reading | None], layer: int, fingerprint: str, path: str
) -> None:
    """A record with no observation file (`path`: `READINGS_ONLY` or `REFUSED`) for each fact not
    yet recorded at all; a fact without a reading is unteachable."""
    known = captured_fact_ids(session, facts, layer, fingerprint, observations=False)
    for fact_id, reading in facts.items():
        if fact_id not in known:
            session.add(
                FactCapture(
                    fact_id=fact_id,
                    layer=layer,
                    fingerprint=fingerprint,
                    object_path=path,
                    object_sha256="",
                    positions=0,
                    context_answer=reading.context_answer if reading is not None else None,
                    teachable=reading.teachable if reading is not None else False,
                    base_answer=reading.base_answer if reading is not None else None,
                )
            )


def unteachable(
    session: Session, fact_ids: Iterable[int], layer: int, fingerprint: str, *, refused_only: bool = False
) -> list[dict[str, Any]]:
    """The facts among `fact_ids` whose capture found the model does not answer them right with
    the fact in context, or refused them as too large for it, as `{"fact_id", "reason",
    "context_answer"}`, by id; `refused_only`: the refused ones alone, which no edit can include."""
    found = [
        c
        for c in find_captures(session, fact_ids, layer, fingerprint)
        if c.teachable is False and (c.object_path == REFUSED or not refused_only)
    ]
    return [
        {
            "fact_id": c.fact_id,
            "reason": TOO_LARGE if c.object_path == REFUSED else UNTEACHABLE,
            "context_answer": c.context_answer,
        }
        for c in sorted(found, key=lambda c: c.fact_id)
    ]


def base_answers(session: Session, fact_ids: Iterable[int], layer: int, fingerprint: str) -> dict[int, str]:
    """What the base model answers to each fact's question without its context, where captured."""
    return {
        c.fact_id: c.base_answer
        for c in find_captures(session, fact_ids, layer, fingerprint)
        if c.base_answer is not None
    }
