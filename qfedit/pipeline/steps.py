"""The first two steps of a batch: start it, capture its shards.

    start_batch     take the model's line, fix the parent version, cut the facts into shards
    capture_shard   capture one shard's observations, store them, mark the shard done

The third, solving and publishing, is `qfedit.pipeline.publish`. Each step takes ids, re-reads
the database, and can run twice (a redelivered task) without doing its work twice: shards and
batches advance by conditional updates and files are content-addressed. The job queue
(`worker/`) only calls these and enqueues what they say comes next; nothing here imports Celery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit.capture import check_fits
from qfedit.config import Settings
from qfedit.db.models import (
    Batch,
    BatchKind,
    BatchShard,
    BatchStatus,
    FactRow,
    Model,
    ShardStatus,
    Version,
)
from qfedit.edit import capture_observations
from qfedit.errors import NotFoundError, PermanentError
from qfedit.facts import Fact, FactError
from qfedit.modeling import LoadedModel, load_model
from qfedit.pipeline import captures, lifecycle
from qfedit.pipeline.observations import observation_file
from qfedit.pipeline.settings import ModelSettings, batch_settings
from qfedit.registry.audit import record_audit
from qfedit.registry.batches import batch_fact_ids, get_batch
from qfedit.registry.facts import to_record
from qfedit.registry.models import base_mismatch
from qfedit.registry.versions import latest_version, version_fact_ids
from qfedit.store import CheckpointStore, StoredObject
from qfedit.teachable import Reading, read_with_context

log = logging.getLogger(__name__)


@dataclass
class Next:
    """What the queue should run after a step."""

    capture: list[int] = field(default_factory=list)
    solve: bool = False
    wait: bool = False
    """The model's line is held by another batch: try again later."""


class ModelCache:
    """Base models loaded once per worker process, checked against the registered fingerprint,
    and how large a fact they capture may be."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: dict[int, LoadedModel] = {}
        self.fact_limits = settings.fact_limits

    def get(self, model: Model) -> LoadedModel:
        if model.id not in self._loaded:
            loaded = load_model(model.source, dtype=self._settings.dtype, device=self._settings.device)
            mismatch = base_mismatch(model, loaded.fingerprint, model.source)
            if mismatch:
                raise PermanentError(mismatch)
            self._loaded[model.id] = loaded
        return self._loaded[model.id]


def _refuse(session: Session, batch_id: int, model: Model, layer: int, refused: dict[int, str]) -> None:
    """Record facts too large for the model: never captured, named in the log and the audit log."""
    for reason in refused.values():
        log.warning("batch %s: %s", batch_id, reason)
    captures.record_refused(session, refused, layer, model.fingerprint)
    record_audit(
        session,
        actor=lifecycle.SYSTEM,
        action="facts.refused",
        object_type="batch",
        object_id=batch_id,
        model_id=model.id,
        details={
            "layer": layer,
            "count": len(refused),
            "facts": [{"fact_id": i, "reason": r} for i, r in sorted(refused.items())][:100],
        },
    )


def start_batch(session: Session, batch_id: int) -> Next:
    """Take the model's line, fix the parent, and cut uncaptured facts into shards. Commits."""
    batch = get_batch(session, batch_id, for_update=True)
    if batch.status in lifecycle.FINAL:
        return Next()
    settings = batch_settings(batch)
    if batch.status == BatchStatus.QUEUED:
        if not lifecycle.take_line(session, batch):
            session.rollback()
            return Next(wait=True)
        head = latest_version(session, batch.model)
        batch.parent_version_id = head.id if head is not None else None
        lifecycle.transition_batch(
            session, batch, BatchStatus.CAPTURING, actor=lifecycle.SYSTEM, progress=0.0
        )
        _cut_shards(session, batch, settings)
        session.flush()
    if batch.status == BatchStatus.CAPTURING:
        pending = list(
            session.scalars(
                select(BatchShard.id).where(
                    BatchShard.batch_id == batch.id, BatchShard.status == ShardStatus.PENDING
                )
            )
        )
        if pending:
            session.commit()
            return Next(capture=pending)
        advanced = lifecycle.advance_to_solving(session, batch.id)
        session.commit()
        return Next(solve=advanced)
    session.commit()
    return Next(solve=batch.status in (BatchStatus.SOLVING, BatchStatus.EVALUATING))


def _observe(
    loaded: LoadedModel, store: CheckpointStore, settings: ModelSettings, kept: dict[int, Fact]
) -> tuple[StoredObject, dict[int, int]]:
    """A single-layer batch's observations of the facts `kept` (by id), stored in one file, and how
    many rows each fact has there."""
    try:
        observations = capture_observations(
            loaded,
            list(kept.values()),
            settings.edit,
            labels=[f"fact {fact_id}" for fact_id in kept],
            fact_ids=list(kept),
            shard_size=len(kept),
            batch_size=settings.capture_batch_size,
        )
    except FactError as error:
        raise PermanentError(str(error)) from error
    stored = store.put_bytes(observation_file(observations))
    assert observations.facts is not None
    ids, counts = torch.unique(observations.facts, return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    return stored, {fact_id: found.get(fact_id, 0) for fact_id in kept}


def _cut_shards(session: Session, batch: Batch, settings: ModelSettings) -> None:
    """The facts the solve needs captured and not yet captured at the batch's layer, in shards:
    a spread batch needs its facts' readings alone (its solve recaptures every layer); a
    single-layer batch their observations, and those of the parent version's facts too where
    it cannot add to the parent's statistics (none stored: a spread, or another layer)."""
    layer, shard_size = settings.edit.layer, settings.shard_size
    spread = len(settings.edit.edited_layers) > 1
    needed = set(batch_fact_ids(session, batch)) if batch.kind == BatchKind.EDIT else set()
    parent = session.get(Version, batch.parent_version_id) if batch.parent_version_id is not None else None
    if not spread and parent is not None and (parent.layer != layer or not parent.statistics_path):
        needed |= version_fact_ids(session, parent)
    captured = captures.captured_fact_ids(
        session, needed, layer, batch.model.fingerprint, observations=not spread
    )
    todo = sorted(needed - captured)
    for number, start in enumerate(range(0, len(todo), shard_size)):
        session.add(BatchShard(batch_id=batch.id, number=number, fact_ids=todo[start : start + shard_size]))


def capture_shard(
    session: Session,
    store: CheckpointStore,
    models: ModelCache,
    shard_id: int,
    before_commit: Callable[[], None] | None = None,
) -> int | None:
    """Capture one shard; returns the batch id iff this call moved it to solving (one call does).

    `before_commit` runs after the observations are stored and before the shard is recorded
    done: the crash tests kill the worker there."""
    shard = session.get(BatchShard, shard_id)
    if shard is None:
        raise NotFoundError(f"no shard {shard_id}")
    batch = get_batch(session, shard.batch_id)
    batch_id = batch.id
    if batch.status != BatchStatus.CAPTURING:
        return None
    if shard.status == ShardStatus.DONE:
        session.rollback()
        advanced = lifecycle.advance_to_solving(session, batch_id)
        session.commit()
        return batch_id if advanced else None
    model = batch.model
    settings = batch_settings(batch)
    fingerprint = model.fingerprint
    rows = list(session.scalars(select(FactRow).where(FactRow.id.in_(shard.fact_ids)).order_by(FactRow.id)))
    session.rollback()  # no transaction held open across the forward passes

    loaded = models.get(model)
    # Before any capture work, each fact is measured against the model: one too large for it
    # (counted in characters first, so megabytes are never tokenized) is refused by name and stays
    # out of this batch and the next, like an unteachable fact, instead of failing the batch.
    refused: dict[int, str] = {}
    kept: dict[int, Fact] = {}
    for row in rows:
        record = to_record(row)
        try:
            check_fits(
                loaded, record, f"fact {row.id}", models.fact_limits, include_eos=settings.edit.include_eos
            )
        except FactError as error:
            refused[row.id] = str(error)
        else:
            kept[row.id] = record
    stored: StoredObject | None = None
    readings: dict[int, Reading] = {}
    positions: dict[int, int] = {}
    if kept:
        records = list(kept.values())
        if len(settings.edit.edited_layers) == 1:
            stored, positions = _observe(loaded, store, settings, kept)
        # QF's teacher is the model with the fact in context: what it answers there is what an edit
        # can write (qfedit.teachable); the solve leaves out the facts it gets wrong.
        readings = dict(zip(kept, read_with_context(loaded, records, without=True), strict=True))
    if before_commit is not None:
        before_commit()

    # Record where each fact's observations are, then mark the shard done; both only once.
    if stored is not None:
        captures.record_captures(session, stored, positions, settings.edit.layer, fingerprint, readings)
    elif readings:
        captures.record_readings(session, readings, settings.edit.layer, fingerprint)
    if refused:
        _refuse(session, batch_id, model, settings.edit.layer, refused)
    lifecycle.finish_shard(session, shard_id, batch_id)
    advanced = lifecycle.advance_to_solving(session, batch_id)
    session.commit()
    return batch_id if advanced else None
