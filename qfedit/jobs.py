"""Edit batches as a pipeline of idempotent steps over the database and the checkpoint store.

    start_batch     take the model's line, fix the parent version, cut the facts into shards
    capture_shard   capture one shard's observations, store them, mark the shard done
    solve_batch     sum statistics, solve, store delta, evaluate, record the version, move aliases

Each step takes ids, re-reads the database, and can run twice (a redelivered task) without
doing its work twice: shards and batches advance by conditional updates, a batch gets at most
one version, and files are content-addressed. The job queue (`worker/`) only calls these and
enqueues what they say comes next; nothing here imports Celery.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from qfedit import repository
from qfedit.capture import CaptureOptions, capture
from qfedit.config import Settings
from qfedit.covariance import compute_covariance, corpus_texts
from qfedit.db.models import (
    Batch,
    BatchKind,
    BatchShard,
    BatchStatus,
    FactCapture,
    FactStatus,
    Model,
    ShardStatus,
    Version,
)
from qfedit.db.models import Fact as FactRow
from qfedit.delta import Delta
from qfedit.facts import Fact, FactError, Neighbor
from qfedit.hparams import PreservePositionsSetting, SolveConfig
from qfedit.modeling import LoadedModel, load_model
from qfedit.solve import Preservation, solve
from qfedit.statistics import Observations, Statistics
from qfedit.store import CheckpointStore, StoredObject

log = logging.getLogger(__name__)

SYSTEM = "qfedit-worker"
HEAD = "head"
PRODUCTION = "production"
FINAL = (BatchStatus.PUBLISHED, BatchStatus.FAILED, BatchStatus.CANCELLED)


class PoisonBatchError(ValueError):
    """A batch that cannot succeed however often it is retried (a fact that cannot be captured)."""


class ModelSettings(BaseModel):
    """How a model's batches are edited and judged; stored on the model row."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int | None = Field(default=None, ge=0, description="default: the model's default layer")
    solve: SolveConfig = SolveConfig()
    include_eos: bool = True
    covariance_samples: int = Field(default=20_000, gt=0)
    preserve_positions: PreservePositionsSetting = "answer"
    preservation_corpus: list[str] = Field(
        default_factory=list,
        description="files of text the edit must leave alone: facts JSONL (question/answer transcripts) "
        "or text lines; default: known_facts",
    )
    known_facts: str | None = Field(default=None, description="facts JSONL the model knows, for evaluation")
    unknown_questions: str | None = Field(default=None, description="facts JSONL of unknown-entity questions")
    known_sample: int = Field(default=200, gt=0)
    eval_sample: int | None = Field(
        default=None,
        gt=0,
        description="edited facts evaluated per batch, a seeded random sample (greedy generation "
        "over every fact and paraphrase is most of a large batch's time); None: all of them",
    )
    abstention: str = "I do not know."
    promote: dict[str, float] | None = Field(
        default=None, description="minimum metrics for moving `production` automatically; None: never"
    )
    shard_size: int = Field(default=64, gt=0, description="facts per capture task")
    capture_batch_size: int = Field(default=16, gt=0)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merged(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def model_settings(model: Model, overrides: dict[str, Any] | None = None) -> ModelSettings:
    """The model's settings, with a batch's hyper-parameters over them (e.g. `{"solve": {"lam": 10}}`)."""
    return ModelSettings.model_validate(_merged(model.settings or {}, overrides or {}))


def batch_settings(batch: Batch) -> ModelSettings:
    return model_settings(batch.model, batch.hyperparameters)


def edit_layer(model: Model, settings: ModelSettings) -> int:
    layer = settings.layer if settings.layer is not None else model.default_layer
    if layer is None:
        raise PoisonBatchError(f"model {model.name!r} has no edit layer: register it with --layer")
    return layer


def to_engine_fact(row: FactRow) -> Fact:
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


# -- submission ---------------------------------------------------------------------------


def submit_batch(
    session: Session,
    *,
    model: Model,
    fact_ids: Sequence[int] | None,
    requested_by: str,
    idempotency_key: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> Batch:
    """A queued edit batch; `fact_ids=None` takes every pending fact of the model.

    `hyperparameters` override the model's settings for this batch (validated here, so a typo is
    refused at submission rather than failing the batch later)."""
    try:
        model_settings(model, hyperparameters)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise FactError("batch", f"hyperparameters.{field}", first["msg"]) from None
    if idempotency_key is not None:
        existing = session.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
        if existing is not None and fact_ids is None:
            return existing  # "all pending" was resolved when the batch was first made
    if fact_ids is None:
        fact_ids = list(
            session.scalars(
                select(FactRow.id).where(FactRow.model_id == model.id, FactRow.status == FactStatus.PENDING)
            )
        )
        if not fact_ids:
            raise ValueError(f"model {model.name!r} has no pending facts to edit")
    return repository.create_batch(
        session,
        model=model,
        fact_ids=fact_ids,
        requested_by=requested_by,
        hyperparameters=hyperparameters,
        idempotency_key=idempotency_key,
    )


def submit_retraction(
    session: Session,
    *,
    model: Model,
    fact_ids: Sequence[int],
    reason: str,
    requested_by: str,
    idempotency_key: str | None = None,
) -> Batch:
    """A queued batch that publishes a version without `fact_ids` (subtracting their statistics)."""
    if not reason.strip():
        raise ValueError("a retraction needs a reason")
    batch = repository.create_batch(
        session, model=model, fact_ids=fact_ids, requested_by=requested_by, idempotency_key=idempotency_key
    )
    if batch.kind != BatchKind.RETRACT:
        if batch.status != BatchStatus.QUEUED or batch.attempts:
            raise ValueError(f"idempotency key {idempotency_key!r} names edit batch {batch.id}")
        batch.kind = BatchKind.RETRACT
        batch.reason = reason
    return batch


def cancel_batch(session: Session, batch: Batch, *, actor: str) -> Batch:
    """Cancel a batch that has not published; its facts stay as they were."""
    repository.transition_batch(session, batch, BatchStatus.CANCELLED, actor=actor)
    _release_line(session, batch)
    return batch


def _release_line(session: Session, batch: Batch) -> None:
    session.execute(
        update(Model)
        .where(Model.id == batch.model_id, Model.active_batch_id == batch.id)
        .values(active_batch_id=None)
    )


def fail_batch(session: Session, batch: Batch, error: str, *, actor: str = SYSTEM) -> Batch:
    if batch.status not in FINAL:
        repository.transition_batch(session, batch, BatchStatus.FAILED, actor=actor, error=error[:4000])
    _release_line(session, batch)
    return batch


# -- start ----------------------------------------------------------------------------------


@dataclass
class Next:
    """What the queue should run after a step."""

    capture: list[int] = field(default_factory=list)
    solve: bool = False
    wait: bool = False
    """The model's line is held by another batch: try again later."""


def start_batch(session: Session, batch_id: int) -> Next:
    """Take the model's line, fix the parent, and cut uncaptured facts into shards. Commits."""
    batch = repository.get_batch(session, batch_id, for_update=True)
    if batch.status in FINAL:
        return Next()
    model = batch.model
    settings = batch_settings(batch)
    if batch.status == BatchStatus.QUEUED:
        taken = session.execute(
            update(Model)
            .where(Model.id == model.id)
            .where((Model.active_batch_id.is_(None)) | (Model.active_batch_id == batch.id))
            .values(active_batch_id=batch.id)
        )
        if taken.rowcount == 0:  # type: ignore[attr-defined]
            session.rollback()
            return Next(wait=True)
        head = repository.latest_version(session, model)
        batch.parent_version_id = head.id if head is not None else None
        repository.transition_batch(session, batch, BatchStatus.CAPTURING, actor=SYSTEM, progress=0.0)
        if batch.kind == BatchKind.EDIT:
            layer = edit_layer(model, settings)
            fact_ids = repository.batch_fact_ids(session, batch)
            captured = set(
                session.scalars(
                    select(FactCapture.fact_id).where(
                        FactCapture.fact_id.in_(fact_ids),
                        FactCapture.layer == layer,
                        FactCapture.fingerprint == model.fingerprint,
                    )
                )
            )
            todo = [fact_id for fact_id in fact_ids if fact_id not in captured]
            for number, start in enumerate(range(0, len(todo), settings.shard_size)):
                session.add(
                    BatchShard(
                        batch_id=batch.id, number=number, fact_ids=todo[start : start + settings.shard_size]
                    )
                )
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
        advanced = _advance_to_solving(session, batch.id)
        session.commit()
        return Next(solve=advanced)
    session.commit()
    return Next(solve=batch.status in (BatchStatus.SOLVING, BatchStatus.EVALUATING))


def _advance_to_solving(session: Session, batch_id: int) -> bool:
    """Move a capturing batch to solving iff no shard is pending; true for exactly one caller."""
    pending = exists().where(BatchShard.batch_id == batch_id, BatchShard.status == ShardStatus.PENDING)
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.CAPTURING, ~pending)
        .values(status=BatchStatus.SOLVING, progress=1.0)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    repository.record_audit(
        session,
        actor=SYSTEM,
        action="batch.status",
        object_type="batch",
        object_id=batch_id,
        details={"from": BatchStatus.CAPTURING.value, "to": BatchStatus.SOLVING.value},
    )
    return True


# -- capture --------------------------------------------------------------------------------


class ModelCache:
    """Base models loaded once per worker process, checked against the registered fingerprint."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: dict[int, LoadedModel] = {}

    def get(self, model: Model) -> LoadedModel:
        if model.id not in self._loaded:
            loaded = load_model(model.source, dtype=self._settings.dtype, device=self._settings.device)
            mismatch = repository.base_mismatch(model, loaded.fingerprint, model.source)
            if mismatch:
                raise PoisonBatchError(mismatch)
            self._loaded[model.id] = loaded
        return self._loaded[model.id]


def _observation_file(observations: Observations, fact_ids: torch.Tensor) -> bytes:
    # Keys and errors in float32 halve the store; they are accumulated in float64.
    return save_tensors(
        {
            "keys": observations.keys.to(torch.float32).contiguous().cpu(),
            "errors": observations.errors.to(torch.float32).contiguous().cpu(),
            "weights": observations.weights.contiguous().cpu(),
            "fact_ids": fact_ids.contiguous().cpu(),
        },
        metadata={"format": "qfedit.observations/1"},
    )


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
        raise repository.NotFoundError(f"no shard {shard_id}")
    batch = repository.get_batch(session, shard.batch_id)
    batch_id = batch.id
    if batch.status != BatchStatus.CAPTURING:
        return None
    if shard.status == ShardStatus.DONE:
        session.rollback()
        advanced = _advance_to_solving(session, batch_id)
        session.commit()
        return batch_id if advanced else None
    model = batch.model
    settings = batch_settings(batch)
    layer = edit_layer(model, settings)
    rows = list(session.scalars(select(FactRow).where(FactRow.id.in_(shard.fact_ids)).order_by(FactRow.id)))
    session.rollback()  # no transaction held open across the forward passes

    loaded = models.get(model)
    facts = [to_engine_fact(row) for row in rows]
    try:
        captured = capture(
            loaded,
            facts,
            layer,
            labels=[f"fact {row.id}" for row in rows],
            options=CaptureOptions(batch_size=settings.capture_batch_size, include_eos=settings.include_eos),
        )
    except FactError as error:
        raise PoisonBatchError(str(error)) from error
    weight = loaded.architecture.down_proj_weight(loaded.model, layer).detach().to(torch.float64)
    observations = Observations.from_capture(captured, weight)
    ids = torch.tensor([rows[i].id for i in captured.fact_index.tolist()], dtype=torch.int64)
    stored = store.put_bytes(_observation_file(observations, ids))
    if before_commit is not None:
        before_commit()
    positions = torch.bincount(captured.fact_index, minlength=len(rows)).tolist()

    # Record where each fact's observations are, then mark the shard done; both only once.
    known = set(
        session.scalars(
            select(FactCapture.fact_id).where(
                FactCapture.fact_id.in_(shard.fact_ids),
                FactCapture.layer == layer,
                FactCapture.fingerprint == model.fingerprint,
            )
        )
    )
    for row, count in zip(rows, positions, strict=True):
        if row.id not in known:
            session.add(
                FactCapture(
                    fact_id=row.id,
                    layer=layer,
                    fingerprint=model.fingerprint,
                    object_path=stored.path,
                    object_sha256=stored.sha256,
                    positions=count,
                )
            )
    session.execute(
        update(BatchShard)
        .where(BatchShard.id == shard_id, BatchShard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.DONE)
        .execution_options(synchronize_session=False)
    )
    total = session.scalar(select(func.count()).where(BatchShard.batch_id == batch.id)) or 1
    done = session.scalar(
        select(func.count()).where(BatchShard.batch_id == batch.id, BatchShard.status == ShardStatus.DONE)
    )
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == BatchStatus.CAPTURING)
        .values(progress=min(1.0, (done or 0) / total))
        .execution_options(synchronize_session=False)
    )
    advanced = _advance_to_solving(session, batch_id)
    session.commit()
    return batch_id if advanced else None


# -- solve ----------------------------------------------------------------------------------


def _statistics_from_captures(
    session: Session,
    store: CheckpointStore,
    fact_ids: Iterable[int],
    layer: int,
    fingerprint: str,
    d: int,
    m: int,
) -> Statistics:
    wanted = sorted(set(fact_ids))
    total = Statistics.zeros(d, m, layer, fingerprint)
    if not wanted:
        return total
    captures = list(
        session.scalars(
            select(FactCapture).where(
                FactCapture.fact_id.in_(wanted),
                FactCapture.layer == layer,
                FactCapture.fingerprint == fingerprint,
            )
        )
    )
    missing = set(wanted) - {c.fact_id for c in captures}
    if missing:
        raise RuntimeError(f"facts without captured observations at layer {layer}: {sorted(missing)[:10]}")
    by_file: dict[tuple[str, str], set[int]] = {}
    for item in captures:
        by_file.setdefault((item.object_path, item.object_sha256), set()).add(item.fact_id)
    for (path, sha), ids in sorted(by_file.items()):
        tensors = load_tensors(store.read_bytes(path, sha))
        rows = torch.isin(tensors["fact_ids"], torch.tensor(sorted(ids), dtype=torch.int64))
        part = Observations(
            keys=tensors["keys"][rows].to(torch.float64),
            errors=tensors["errors"][rows].to(torch.float64),
            weights=tensors["weights"][rows].to(torch.float64),
        )
        total = total + Statistics.from_observations(part, layer, fingerprint)
    return total


def _load_statistics(store: CheckpointStore, version: Version) -> Statistics | None:
    if version.statistics_path is None or version.statistics_sha256 is None:
        return None
    return Statistics.from_bytes(store.read_bytes(version.statistics_path, version.statistics_sha256))


def _read_facts_file(path: str | None) -> list[Fact]:
    if path is None:
        return []
    from qfedit.facts import read_jsonl

    return read_jsonl(Path(path))


@dataclass
class SolveOutcome:
    version: Version | None
    published: bool


def solve_batch(
    session_maker: sessionmaker[Session],
    store: CheckpointStore,
    models: ModelCache,
    batch_id: int,
    settings: Settings,
    before_commit: Callable[[], None] | None = None,
) -> SolveOutcome:
    """Solve, store, evaluate and publish a batch whose shards are all captured.

    `before_commit` runs after the delta is stored and before the version is recorded."""
    with session_maker() as session:
        batch = repository.get_batch(session, batch_id)
        existing = session.scalar(select(Version).where(Version.batch_id == batch_id))
        if existing is not None or batch.status not in (BatchStatus.SOLVING, BatchStatus.EVALUATING):
            return SolveOutcome(existing, False)
        model = batch.model
        config = batch_settings(batch)
        layer = edit_layer(model, config)
        parent = (
            session.get(Version, batch.parent_version_id) if batch.parent_version_id is not None else None
        )
        parent_ids = repository.version_fact_ids(session, parent) if parent is not None else set()
        batch_ids = set(repository.batch_fact_ids(session, batch))
        if batch.kind == BatchKind.EDIT:
            fact_ids = parent_ids | batch_ids
            added, removed = batch_ids - parent_ids, set()
        else:
            fact_ids = parent_ids - batch_ids
            added, removed = set(), batch_ids & parent_ids

        loaded = models.get(model)
        weight = loaded.architecture.down_proj_weight(loaded.model, layer).detach().to(torch.float64)
        d, m = weight.shape
        parent_stats = (
            _load_statistics(store, parent) if parent is not None and parent.layer == layer else None
        )
        if parent_stats is not None:
            # The parent's sum plus what this batch adds, minus what it retracts.
            stats = (
                parent_stats
                + _statistics_from_captures(session, store, added, layer, model.fingerprint, d, m)
                - _statistics_from_captures(session, store, removed, layer, model.fingerprint, d, m)
            )
        else:
            stats = _statistics_from_captures(session, store, fact_ids, layer, model.fingerprint, d, m)
        session.rollback()

        delta_object: StoredObject | None = None
        stats_object: StoredObject | None = None
        relative: float | None = None
        delta: Delta | None = None
        if fact_ids:
            preservation = None
            if config.solve.rule == "preserve":
                preservation = build_preservation(loaded, config, layer, settings.cache_dir)
            result = solve(weight, stats, config.solve, preservation)
            relative = result.relative_norm
            name = loaded.architecture.down_proj_name(layer)
            delta = Delta(
                tensors={name: loaded.architecture.to_parameter_layout(result.delta.to(torch.float32))},
                base_fingerprint=model.fingerprint,
                metadata={
                    "layer": layer,
                    "hparams": config.model_dump(mode="json"),
                    "facts": len(fact_ids),
                    "positions": result.positions,
                    "relative_norm": relative,
                    "condition_number": result.condition_number,
                },
            )
            delta_object = store.put_bytes(delta.to_bytes())
            stats_object = store.put_bytes(stats.to_bytes())

        batch = repository.get_batch(session, batch_id, for_update=True)
        repository.transition_batch(session, batch, BatchStatus.EVALUATING, actor=SYSTEM)
        session.commit()

        metrics = _evaluate(loaded, session, config, added, delta)
        if before_commit is not None:
            before_commit()

        batch = repository.get_batch(session, batch_id, for_update=True)
        existing = session.scalar(select(Version).where(Version.batch_id == batch_id))
        if existing is not None or batch.status != BatchStatus.EVALUATING:
            session.rollback()
            return SolveOutcome(existing, False)
        version = repository.record_version(
            session,
            model=model,
            fact_ids=fact_ids,
            created_by=batch.requested_by,
            reason=batch.reason or f"batch {batch.id}: {batch.kind.value} of {len(batch_ids)} facts",
            checkpoint=delta_object,
            statistics=stats_object,
            layer=layer,
            rule=config.solve.rule,
            hyperparameters=config.model_dump(mode="json"),
            relative_update_norm=relative,
            metrics=metrics,
            parent=parent,
            batch=batch,
        )
        if added:
            repository.set_fact_status(
                session, added, FactStatus.APPLIED, actor=SYSTEM, reason=f"batch {batch.id}"
            )
        if removed:
            repository.set_fact_status(
                session, removed, FactStatus.RETRACTED, actor=batch.requested_by, reason=batch.reason or ""
            )
        _move_alias(session, model, HEAD, version, f"batch {batch.id} published")
        if config.promote is not None and _passes(metrics, config.promote):
            _move_alias(session, model, PRODUCTION, version, f"batch {batch.id} passed {config.promote}")
        repository.transition_batch(session, batch, BatchStatus.PUBLISHED, actor=SYSTEM)
        _release_line(session, batch)
        session.commit()
        log.info("batch %d published %s", batch_id, version.label)
        return SolveOutcome(version, True)


def build_preservation(
    loaded: LoadedModel, config: ModelSettings, layer: int, cache_dir: Path | None
) -> Preservation:
    corpus = config.preservation_corpus or ([config.known_facts] if config.known_facts else [])
    if not corpus:
        raise PoisonBatchError(
            "the preserving rule needs a preservation corpus or known facts in the model's settings"
        )
    texts = corpus_texts(loaded, [Path(name) for name in corpus])
    covariance, _ = compute_covariance(
        loaded,
        texts,
        layer,
        positions=config.preserve_positions,
        samples=config.covariance_samples,
        cache_dir=cache_dir,
    )
    return Preservation(covariance.to(torch.float64), ridge=config.solve.ridge)


def _evaluate(
    loaded: LoadedModel, session: Session, config: ModelSettings, added: set[int], delta: Delta | None
) -> dict[str, Any]:
    from qfedit.evaluate import evaluate

    ids = sorted(added)
    if config.eval_sample is not None and len(ids) > config.eval_sample:
        # Seeded by the fact set, so a retried or re-run batch measures the same facts.
        ids = sorted(random.Random(",".join(map(str, ids))).sample(ids, config.eval_sample))
    rows = list(session.scalars(select(FactRow).where(FactRow.id.in_(ids))))
    session.rollback()
    known = _read_facts_file(config.known_facts)[: config.known_sample]
    unknown = [f.question for f in _read_facts_file(config.unknown_questions)]
    if not rows and not known and not unknown:
        return {}
    report = evaluate(
        loaded,
        [to_engine_fact(row) for row in rows],
        delta,
        known=known,
        unknown=unknown,
        abstention=config.abstention,
    )
    payload = report.to_json()
    payload.pop("details", None)
    payload["counts"]["edited"] = len(added)
    return payload


def _passes(metrics: dict[str, Any], thresholds: dict[str, float]) -> bool:
    return all(isinstance(metrics.get(k), int | float) and metrics[k] >= v for k, v in thresholds.items())


def _move_alias(session: Session, model: Model, name: str, version: Version, reason: str) -> None:
    try:
        current = repository.get_alias(session, model, name)
        expected: int | None = current.revision
    except repository.NotFoundError:
        expected = None
    repository.set_alias(
        session, name=name, version=version, reason=reason, actor=SYSTEM, expect_revision=expected
    )


# -- scheduling ------------------------------------------------------------------------------


def nightly_batches(session: Session, day: str, *, actor: str = "qfedit-beat") -> list[Batch]:
    """One batch of pending facts per model, keyed by model and day: re-runs make no second batch."""
    batches = []
    for model in repository.list_models(session):
        key = f"nightly:{model.name}:{day}"
        try:
            batches.append(
                submit_batch(session, model=model, fact_ids=None, requested_by=actor, idempotency_key=key)
            )
        except ValueError:
            continue  # nothing pending for this model
    return batches


def stalled_batches(session: Session, older_than_s: float) -> list[int]:
    """Batches in flight whose last change is older than `older_than_s`: a lost message to resend."""
    from datetime import timedelta

    from qfedit.db.models import utcnow

    cutoff = utcnow() - timedelta(seconds=older_than_s)
    in_flight = (BatchStatus.QUEUED, BatchStatus.CAPTURING, BatchStatus.SOLVING, BatchStatus.EVALUATING)
    return list(
        session.scalars(select(Batch.id).where(and_(Batch.status.in_(in_flight), Batch.updated_at < cutoff)))
    )


@dataclass(frozen=True)
class Progress:
    stage: str
    facts: int
    captured: int
    """Facts of the batch whose observations are stored (captured now or by an earlier batch)."""


def batch_progress(session: Session, batch: Batch) -> Progress:
    facts = repository.batch_fact_count(session, batch)
    shards = list(session.scalars(select(BatchShard).where(BatchShard.batch_id == batch.id)))
    to_capture = sum(len(shard.fact_ids) for shard in shards)
    done = sum(len(shard.fact_ids) for shard in shards if shard.status == ShardStatus.DONE)
    if batch.status == BatchStatus.QUEUED:
        captured = 0
    else:
        captured = facts - to_capture + done if batch.kind == BatchKind.EDIT else facts
    return Progress(batch.status.value, facts, captured)
