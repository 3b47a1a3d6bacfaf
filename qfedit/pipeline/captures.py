"""Captured observations in the store, and the records that say where each fact's are.

A capture task writes one observation file per shard (keys, errors, weights and fact ids, in
float32 where the engine keeps float32 values) and records, per fact, the file that holds its
rows at `(layer, base fingerprint)`. Captures outlive batches: a fact captured once at a layer
is never captured there again, and a retraction reads its rows back to subtract them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit.db.models import FactCapture
from qfedit.errors import PermanentError
from qfedit.registry.base import chunks
from qfedit.statistics import STATISTICS_RUN, Observations, Statistics, fact_runs
from qfedit.store import CheckpointStore, StoredObject
from qfedit.teachable import Reading
from qfedit.tensorfile import check_format

FORMAT = "qfedit.observations/1"
REFUSED = ""
"""The `object_path` of a fact refused before capture (too large for the model): no observations.
Its record keeps it out of later batches as an unteachable fact's does; `teachable` is False."""
UNTEACHABLE = "unteachable: with the fact as its system message the model answers otherwise"
TOO_LARGE = (
    "refused before capture: longer than the model's context or the fact size limits "
    "(the audit log's facts.refused entry has the numbers)"
)


def observation_file(observations: Observations) -> bytes:
    """Observations whose `facts` are database fact ids, as a store file."""
    if observations.facts is None:
        raise ValueError("stored observations need the fact id of every row")
    return save_tensors(
        {
            # Float32 is exact: `Observations` holds float32 values (see there).
            "keys": observations.keys.to(torch.float32).contiguous().cpu(),
            "errors": observations.errors.to(torch.float32).contiguous().cpu(),
            "weights": observations.weights.contiguous().cpu(),
            "fact_ids": observations.facts.contiguous().cpu(),
        },
        metadata={"format": FORMAT},
    )


def read_observation_file(data: bytes, where: str = "observations") -> Observations:
    check_format(data, FORMAT, where)
    tensors = load_tensors(data)
    return Observations(
        keys=tensors["keys"].to(torch.float64),
        errors=tensors["errors"].to(torch.float64),
        weights=tensors["weights"].to(torch.float64),
        facts=tensors["fact_ids"],
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


def captured_fact_ids(session: Session, fact_ids: Iterable[int], layer: int, fingerprint: str) -> set[int]:
    return {capture.fact_id for capture in find_captures(session, fact_ids, layer, fingerprint)}


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
    recorded (a redelivered task records nothing twice)."""
    known = captured_fact_ids(session, positions, layer, fingerprint)
    for fact_id, count in positions.items():
        if fact_id not in known:
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


def record_refused(session: Session, refused: Iterable[int], layer: int, fingerprint: str) -> None:
    """Record that the facts `refused` cannot be captured at all (too large for the model), so
    that no batch captures them again; a redelivered task records nothing twice."""
    refused = sorted(set(refused))
    known = captured_fact_ids(session, refused, layer, fingerprint)
    for fact_id in refused:
        if fact_id not in known:
            session.add(
                FactCapture(
                    fact_id=fact_id,
                    layer=layer,
                    fingerprint=fingerprint,
                    object_path=REFUSED,
                    object_sha256="",
                    positions=0,
                    teachable=False,
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


def observation_runs(
    session: Session,
    store: CheckpointStore,
    fact_ids: Iterable[int],
    layer: int,
    fingerprint: str,
    run: int = STATISTICS_RUN,
) -> Iterator[Observations]:
    """The stored observations of `fact_ids`, in id order, cut as `fact_runs` cuts them: the
    runs whose statistics sum to exactly what an edit in one process computes."""
    wanted = sorted(set(fact_ids))
    captures = {c.fact_id: c for c in find_captures(session, wanted, layer, fingerprint)}
    missing = [fact_id for fact_id in wanted if fact_id not in captures]
    if missing:
        raise PermanentError(f"facts without captured observations at layer {layer}: {missing[:10]}")
    # Each file is read once, and dropped when the last of its facts has been used.
    remaining: dict[tuple[str, str], int] = {}
    for capture in captures.values():
        key = (capture.object_path, capture.object_sha256)
        remaining[key] = remaining.get(key, 0) + 1
    files: dict[tuple[str, str], Observations] = {}
    for start in range(0, len(wanted), run):
        ids = wanted[start : start + run]
        parts = []
        for key in sorted({(captures[i].object_path, captures[i].object_sha256) for i in ids}):
            if key not in files:
                files[key] = read_observation_file(store.read_bytes(*key), key[0])
            observations = files[key]
            assert observations.facts is not None
            parts.append(observations.rows(torch.isin(observations.facts, torch.tensor(ids))))
        yield from fact_runs(Observations.concatenate(parts), ids, run=len(ids))
        for i in ids:
            key = (captures[i].object_path, captures[i].object_sha256)
            remaining[key] -= 1
            if remaining[key] == 0:
                files.pop(key, None)


def stored_statistics(
    session: Session,
    store: CheckpointStore,
    fact_ids: Sequence[int] | set[int],
    *,
    layer: int,
    fingerprint: str,
    d: int,
    m: int,
) -> Statistics:
    """The statistics of `fact_ids` from their stored observations."""
    runs = observation_runs(session, store, fact_ids, layer, fingerprint)
    return Statistics.accumulate(runs, d=d, m=m, layer=layer, fingerprint=fingerprint)


def base_answers(session: Session, fact_ids: Iterable[int], layer: int, fingerprint: str) -> dict[int, str]:
    """What the base model answers to each fact's question without its context, where captured."""
    return {
        c.fact_id: c.base_answer
        for c in find_captures(session, fact_ids, layer, fingerprint)
        if c.base_answer is not None
    }
