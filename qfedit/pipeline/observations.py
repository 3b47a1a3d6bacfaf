"""Captured observations as store files: one per capture shard (keys, errors, weights and fact
ids), found through the records of `qfedit.pipeline.captures`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy.orm import Session

from qfedit.errors import PermanentError
from qfedit.pipeline.captures import find_captures
from qfedit.statistics import STATISTICS_RUN, Observations, Statistics, fact_runs
from qfedit.store import CheckpointStore
from qfedit.tensorfile import check_format

FORMAT = "qfedit.observations/1"


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
