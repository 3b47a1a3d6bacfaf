"""Library functions over the database: models, facts, batches, versions, aliases, audit log.

Every function takes a `Session` and never commits: the caller owns the transaction, so a task
or a request can combine several calls into one atomic change. Every change that matters to
the history of a model's weights also writes an audit entry in the same transaction.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qfedit.db.models import (
    Alias,
    AliasMove,
    AuditEntry,
    Batch,
    BatchFact,
    BatchStatus,
    Fact,
    FactCapture,
    FactStatus,
    Model,
    Version,
    VersionFact,
    utcnow,
)
from qfedit.store import CheckpointStore, StoredObject

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Keeps `IN (...)` lists under SQLite's bound-parameter limit.
_ID_CHUNK = 5000


class NotFoundError(LookupError):
    """A model, version, alias or batch that does not exist."""


class AliasConflictError(RuntimeError):
    """A compare-and-set alias move whose expectation no longer holds (someone else moved it)."""


class InvalidTransitionError(ValueError):
    """A batch status change the lifecycle does not allow."""


class _Unset(enum.Enum):
    TOKEN = 0


UNSET = _Unset.TOKEN


def _check_name(kind: str, name: str) -> str:
    # `@` separates model and version in references (`qwen@3`), so names cannot hold it.
    if not _NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _chunks(ids: Sequence[int], size: int = _ID_CHUNK) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def digest_of_hashes(content_hashes: Iterable[str]) -> str:
    """Same value as `qfedit.facts.fact_set_digest` over the facts with these content hashes."""
    return hashlib.sha256("\n".join(sorted(content_hashes)).encode()).hexdigest()


# -- audit ------------------------------------------------------------------------------


def record_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_id: str | int,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        actor=actor, action=action, object_type=object_type, object_id=str(object_id), details=details or {}
    )
    session.add(entry)
    return entry


def list_audit(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    since: datetime | None = None,
    limit: int | None = 100,
) -> list[AuditEntry]:
    """Newest first. `action` matches a prefix, so `alias` finds `alias.set`."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc())
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if action is not None:
        query = query.where(AuditEntry.action.startswith(action, autoescape=True))
    if object_type is not None:
        query = query.where(AuditEntry.object_type == object_type)
    if object_id is not None:
        query = query.where(AuditEntry.object_id == object_id)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


# -- models -----------------------------------------------------------------------------


def add_model(
    session: Session,
    *,
    name: str,
    source: str,
    fingerprint: str,
    actor: str,
    revision: str | None = None,
    default_layer: int | None = None,
) -> Model:
    """Register a base model and its version 0 (the unedited weights)."""
    _check_name("model", name)
    if default_layer is not None and default_layer < 0:
        raise ValueError(f"default layer must be >= 0, not {default_layer}")
    if session.scalar(select(Model.id).where(Model.name == name)) is not None:
        raise ValueError(f"a model named {name!r} is already registered")
    model = Model(
        name=name,
        source=source,
        revision=revision,
        fingerprint=fingerprint,
        default_layer=default_layer,
        created_by=actor,
    )
    session.add(model)
    session.flush()
    base = Version(
        model_id=model.id,
        number=0,
        fact_set_digest=digest_of_hashes([]),
        fact_count=0,
        created_by=actor,
        reason="base model",
    )
    session.add(base)
    session.flush()
    record_audit(
        session,
        actor=actor,
        action="model.add",
        object_type="model",
        object_id=model.id,
        details={"name": name, "source": source, "revision": revision, "fingerprint": fingerprint},
    )
    return model


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.name)))


def get_model(session: Session, name: str) -> Model:
    """The model named `name`; the error lists the registered names."""
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        names = [m.name for m in list_models(session)]
        known = ", ".join(names) if names else "none; add one with `qfedit model add`"
        raise NotFoundError(f"no model named {name!r} (registered: {known})")
    return model


def base_mismatch(model: Model, fingerprint: str, where: str) -> str | None:
    """Why weights of `fingerprint` (found at `where`) cannot stand for `model`, or None if they can.

    Every version's delta was solved for the weights the model was registered with, so a caller
    must refuse any others; the caller picks the exception that fits its layer.
    """
    if fingerprint == model.fingerprint:
        return None
    return (
        f"model {model.name!r} is registered with base weights {model.fingerprint}, "
        f"but {where} holds {fingerprint}"
    )


# -- facts ------------------------------------------------------------------------------


def list_facts(
    session: Session,
    *,
    model: Model | None = None,
    status: FactStatus | None = None,
    source: str | None = None,
    text: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Fact]:
    """Facts by id; `text` matches a substring of the question, answer, context or subject, any case."""
    query = select(Fact).order_by(Fact.id).offset(offset)
    if model is not None:
        query = query.where(Fact.model_id == model.id)
    if status is not None:
        query = query.where(Fact.status == status)
    if source is not None:
        query = query.where(Fact.source == source)
    if text:
        columns = (Fact.question, Fact.answer, Fact.context, Fact.subject)
        query = query.where(or_(*(column.icontains(text, autoescape=True) for column in columns)))
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def count_facts(session: Session, *, model: Model | None = None) -> dict[str, int]:
    query = select(Fact.status, func.count()).group_by(Fact.status)
    if model is not None:
        query = query.where(Fact.model_id == model.id)
    return {status.value: count for status, count in session.execute(query)}


def _facts_of_model(session: Session, model: Model, fact_ids: Iterable[int]) -> dict[int, str]:
    """id -> content hash for `fact_ids`, all of which must be facts of `model`."""
    wanted = sorted(set(fact_ids))
    found: dict[int, str] = {}
    for chunk in _chunks(wanted):
        rows = session.execute(
            select(Fact.id, Fact.content_hash).where(Fact.model_id == model.id, Fact.id.in_(chunk))
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
    for chunk in _chunks(ids):
        result = session.execute(
            update(Fact).where(Fact.id.in_(chunk), Fact.status != status).values(status=status),
            execution_options={"synchronize_session": "fetch"},
        )
        changed += result.rowcount  # type: ignore[attr-defined]
    record_audit(
        session,
        actor=actor,
        action="fact.status",
        object_type="fact",
        object_id=",".join(map(str, ids[:20])) + ("..." if len(ids) > 20 else ""),
        details={"status": status.value, "count": len(ids), "changed": changed, "reason": reason},
    )
    return changed


# -- batches ----------------------------------------------------------------------------

_ACTIVE = (BatchStatus.QUEUED, BatchStatus.CAPTURING, BatchStatus.SOLVING, BatchStatus.EVALUATING)
BATCH_TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.QUEUED: frozenset({BatchStatus.CAPTURING, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    BatchStatus.CAPTURING: frozenset({BatchStatus.SOLVING, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    BatchStatus.SOLVING: frozenset({BatchStatus.EVALUATING, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    BatchStatus.EVALUATING: frozenset({BatchStatus.PUBLISHED, BatchStatus.FAILED, BatchStatus.CANCELLED}),
    # A failed batch may be queued again (a retry); published and cancelled are final.
    BatchStatus.FAILED: frozenset({BatchStatus.QUEUED}),
    BatchStatus.PUBLISHED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}


def create_batch(
    session: Session,
    *,
    model: Model,
    fact_ids: Iterable[int],
    requested_by: str,
    hyperparameters: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Batch:
    """A queued batch of `fact_ids`; the same `idempotency_key` returns the batch it first made."""
    ids = sorted(set(fact_ids))
    if not ids:
        raise ValueError("a batch needs at least one fact")
    if idempotency_key is not None:
        existing = session.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.model_id != model.id or batch_fact_ids(session, existing) != ids:
                raise ValueError(
                    f"idempotency key {idempotency_key!r} was already used for batch {existing.id} "
                    "with a different model or fact set"
                )
            return existing
    _facts_of_model(session, model, ids)
    batch = Batch(
        model_id=model.id,
        hyperparameters=dict(hyperparameters or {}),
        idempotency_key=idempotency_key,
        requested_by=requested_by,
    )
    session.add(batch)
    session.flush()
    for chunk in _chunks(ids):
        session.execute(insert(BatchFact), [{"batch_id": batch.id, "fact_id": fact_id} for fact_id in chunk])
    record_audit(
        session,
        actor=requested_by,
        action="batch.create",
        object_type="batch",
        object_id=batch.id,
        details={"model": model.name, "facts": len(ids), "idempotency_key": idempotency_key},
    )
    return batch


def get_batch(session: Session, batch_id: int, *, for_update: bool = False) -> Batch:
    query = select(Batch).where(Batch.id == batch_id)
    if for_update:
        # Row lock on PostgreSQL, so two deliveries of a task cannot both advance one batch.
        query = query.with_for_update()
    batch = session.scalar(query)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}")
    return batch


def list_batches(
    session: Session,
    *,
    model: Model | None = None,
    status: BatchStatus | None = None,
    limit: int | None = 100,
    offset: int = 0,
) -> list[Batch]:
    """Newest first."""
    query = select(Batch).order_by(Batch.id.desc()).offset(offset)
    if model is not None:
        query = query.where(Batch.model_id == model.id)
    if status is not None:
        query = query.where(Batch.status == status)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def batch_fact_count(session: Session, batch: Batch) -> int:
    return session.scalar(select(func.count()).where(BatchFact.batch_id == batch.id)) or 0


def version_of_batch(session: Session, batch: Batch) -> Version | None:
    """The version a batch published, if it has."""
    return session.scalar(select(Version).where(Version.batch_id == batch.id).limit(1))


def batch_fact_ids(session: Session, batch: Batch) -> list[int]:
    return list(
        session.scalars(
            select(BatchFact.fact_id).where(BatchFact.batch_id == batch.id).order_by(BatchFact.fact_id)
        )
    )


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
            set_batch_progress(batch, progress)
        return batch
    if status not in BATCH_TRANSITIONS[batch.status]:
        allowed = ", ".join(sorted(s.value for s in BATCH_TRANSITIONS[batch.status])) or "none (final)"
        raise InvalidTransitionError(
            f"batch {batch.id}: cannot go from {batch.status.value} to {status.value} (allowed: {allowed})"
        )
    previous = batch.status
    batch.status = status
    now = utcnow()
    if status == BatchStatus.CAPTURING:
        batch.attempts += 1
        batch.started_at = batch.started_at or now
    if status == BatchStatus.QUEUED:
        batch.error = None
        batch.progress = 0.0
    if status in (BatchStatus.PUBLISHED, BatchStatus.FAILED, BatchStatus.CANCELLED):
        batch.finished_at = now
    if status == BatchStatus.PUBLISHED:
        batch.progress = 1.0
    if error is not None:
        batch.error = error
    if progress is not None:
        set_batch_progress(batch, progress)
    record_audit(
        session,
        actor=actor,
        action="batch.status",
        object_type="batch",
        object_id=batch.id,
        details={"from": previous.value, "to": status.value, **({"error": error} if error else {})},
    )
    return batch


def set_batch_progress(batch: Batch, progress: float) -> None:
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be between 0 and 1, not {progress}")
    batch.progress = progress


# -- versions ---------------------------------------------------------------------------


def record_version(
    session: Session,
    *,
    model: Model,
    fact_ids: Iterable[int],
    created_by: str,
    reason: str,
    checkpoint: StoredObject | None,
    layer: int | None,
    rule: str | None,
    hyperparameters: dict[str, Any] | None = None,
    relative_update_norm: float | None = None,
    metrics: dict[str, Any] | None = None,
    parent: Version | None = None,
    batch: Batch | None = None,
    statistics: StoredObject | None = None,
) -> Version:
    """Register a new immutable version holding exactly `fact_ids` (its full fact set).

    Call it only after the checkpoint is in the store (`CheckpointStore.put_*`): the row then
    never points at a missing or half-written file. The number is one more than the model's
    highest; a concurrent writer that takes it first makes this retry with the next.
    `parent` defaults to the model's latest version.
    """
    if not reason.strip():
        raise ValueError("a version needs a reason")
    if parent is not None and parent.model_id != model.id:
        raise ValueError(f"parent {parent.label} belongs to another model than {model.name!r}")
    if batch is not None and batch.model_id != model.id:
        raise ValueError(f"batch {batch.id} belongs to another model than {model.name!r}")
    hashes = _facts_of_model(session, model, fact_ids)
    if parent is None:
        parent = latest_version(session, model)
    for _attempt in range(5):
        number = (
            session.scalar(select(func.max(Version.number)).where(Version.model_id == model.id)) or 0
        ) + 1
        version = Version(
            model_id=model.id,
            number=number,
            parent_id=parent.id if parent is not None else None,
            batch_id=batch.id if batch is not None else None,
            checkpoint_path=checkpoint.path if checkpoint is not None else None,
            checkpoint_sha256=checkpoint.sha256 if checkpoint is not None else None,
            statistics_path=statistics.path if statistics is not None else None,
            statistics_sha256=statistics.sha256 if statistics is not None else None,
            layer=layer,
            rule=rule,
            hyperparameters=dict(hyperparameters or {}),
            relative_update_norm=relative_update_norm,
            metrics=dict(metrics or {}),
            fact_set_digest=digest_of_hashes(hashes.values()),
            fact_count=len(hashes),
            created_by=created_by,
            reason=reason,
        )
        try:
            with session.begin_nested():
                session.add(version)
                session.flush()
        except IntegrityError:
            session.expunge(version)
            continue
        break
    else:
        raise RuntimeError(f"could not allocate a version number for {model.name!r} after 5 attempts")
    ids = sorted(hashes)
    for chunk in _chunks(ids):
        session.execute(
            insert(VersionFact), [{"version_id": version.id, "fact_id": fact_id} for fact_id in chunk]
        )
    record_audit(
        session,
        actor=created_by,
        action="version.create",
        object_type="version",
        object_id=version.id,
        details={
            "version": f"{model.name}@{number}",
            "parent": parent.number if parent is not None else None,
            "batch": batch.id if batch is not None else None,
            "facts": len(ids),
            "checkpoint_sha256": version.checkpoint_sha256,
            "reason": reason,
        },
    )
    return version


def latest_version(session: Session, model: Model) -> Version | None:
    return session.scalar(
        select(Version).where(Version.model_id == model.id).order_by(Version.number.desc()).limit(1)
    )


def list_versions(session: Session, *, model: Model | None = None) -> list[Version]:
    query = select(Version).join(Model).order_by(Model.name, Version.number)
    if model is not None:
        query = query.where(Version.model_id == model.id)
    return list(session.scalars(query))


def get_version(session: Session, ref: str | int, *, model: Model | None = None) -> Version:
    """Resolve `MODEL@NUMBER`, `MODEL@ALIAS`, or a bare `NUMBER` or `ALIAS`.

    A bare reference needs `model`, or exactly one registered model.
    """
    text = str(ref).strip()
    model_name, sep, rest = text.partition("@")
    if sep:
        model = get_model(session, model_name)
    else:
        rest = text
        if model is None:
            models = list_models(session)
            if len(models) != 1:
                names = ", ".join(m.name for m in models) or "none"
                raise NotFoundError(f"version {text!r} is ambiguous: write MODEL@{text} (models: {names})")
            model = models[0]
    if rest.isdigit():
        version = session.scalar(
            select(Version).where(Version.model_id == model.id, Version.number == int(rest))
        )
        if version is None:
            raise NotFoundError(f"no version {model.name}@{rest}")
        return version
    alias = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == rest))
    if alias is None:
        raise NotFoundError(f"{text!r} is neither a version number nor an alias of model {model.name!r}")
    return alias.version


def versions_with_fact(session: Session, fact: Fact) -> list[Version]:
    """Every version whose fact set holds `fact`, oldest first."""
    return list(
        session.scalars(
            select(Version)
            .join(VersionFact, VersionFact.version_id == Version.id)
            .where(VersionFact.fact_id == fact.id)
            .order_by(Version.number)
        )
    )


def get_fact(session: Session, fact_id: int) -> Fact:
    fact = session.get(Fact, fact_id)
    if fact is None:
        raise NotFoundError(f"no fact {fact_id}")
    return fact


def version_fact_ids(session: Session, version: Version) -> set[int]:
    return set(session.scalars(select(VersionFact.fact_id).where(VersionFact.version_id == version.id)))


def aliases_by_version(session: Session, model: Model | None = None) -> dict[int, list[str]]:
    query = select(Alias.version_id, Alias.name).order_by(Alias.name)
    if model is not None:
        query = query.where(Alias.model_id == model.id)
    found: dict[int, list[str]] = {}
    for version_id, name in session.execute(query):
        found.setdefault(version_id, []).append(name)
    return found


@dataclass
class VersionDiff:
    old: Version
    new: Version
    added: list[Fact]
    removed: list[Fact]
    metric_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    weight_difference_norm: float | None = None  # Frobenius norm of delta(new) - delta(old)


def _load_facts(session: Session, ids: Iterable[int]) -> list[Fact]:
    wanted = sorted(ids)
    found: list[Fact] = []
    for chunk in _chunks(wanted):
        found.extend(session.scalars(select(Fact).where(Fact.id.in_(chunk)).order_by(Fact.id)))
    return found


def diff_versions(
    session: Session, old: Version, new: Version, *, store: CheckpointStore | None = None
) -> VersionDiff:
    """Facts added and removed, metrics that changed, and (with `store`) the norm of the weight difference."""
    if old.model_id != new.model_id:
        raise ValueError(f"{old.label} and {new.label} are versions of different models")
    old_ids, new_ids = version_fact_ids(session, old), version_fact_ids(session, new)
    changes = {
        key: (old.metrics.get(key), new.metrics.get(key))
        for key in sorted(set(old.metrics) | set(new.metrics))
        if old.metrics.get(key) != new.metrics.get(key)
    }
    diff = VersionDiff(
        old=old,
        new=new,
        added=_load_facts(session, new_ids - old_ids),
        removed=_load_facts(session, old_ids - new_ids),
        metric_changes=changes,
    )
    if store is not None:
        diff.weight_difference_norm = weight_difference_norm(store, old, new)
    return diff


def weight_difference_norm(store: CheckpointStore, old: Version, new: Version) -> float:
    """|W_new - W_old|_F over all parameters either delta touches (the base model's delta is zero)."""
    import torch

    from qfedit.delta import Delta

    def load(version: Version) -> dict[str, torch.Tensor]:
        if version.checkpoint_path is None or version.checkpoint_sha256 is None:
            return {}
        data = store.read_bytes(version.checkpoint_path, version.checkpoint_sha256)
        return dict(Delta.from_bytes(data, version.label).tensors)

    old_delta, new_delta = load(old), load(new)
    total = torch.zeros((), dtype=torch.float64)
    for name in sorted(set(old_delta) | set(new_delta)):
        a, b = old_delta.get(name), new_delta.get(name)
        if a is not None and b is not None and a.shape != b.shape:
            raise ValueError(f"parameter {name}: delta shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        difference = (b.double() if b is not None else 0) - (a.double() if a is not None else 0)
        assert isinstance(difference, torch.Tensor)
        total += difference.pow(2).sum()
    return float(total.sqrt())


def referenced_checkpoints(session: Session) -> set[str]:
    """Every store path the database records: versions' deltas and statistics, facts' captures."""
    deltas = session.scalars(select(Version.checkpoint_path).where(Version.checkpoint_path.is_not(None)))
    statistics = session.scalars(select(Version.statistics_path).where(Version.statistics_path.is_not(None)))
    # Captured observations are referenced by facts, not versions: losing them forces a recapture.
    captures = session.scalars(select(FactCapture.object_path).distinct())
    return {*deltas, *statistics, *captures}


def describe_version(version: Version, aliases: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON-ready view of a version, for the CLI's `--json` and the API."""
    return {
        "id": version.id,
        "model": version.model.name,
        "number": version.number,
        "label": version.label,
        "parent": version.parent.number if version.parent is not None else None,
        "batch": version.batch_id,
        "created_at": version.created_at.isoformat(),
        "created_by": version.created_by,
        "reason": version.reason,
        "layer": version.layer,
        "rule": version.rule,
        "hyperparameters": version.hyperparameters,
        "relative_update_norm": version.relative_update_norm,
        "metrics": version.metrics,
        "fact_count": version.fact_count,
        "fact_set_digest": version.fact_set_digest,
        "checkpoint_path": version.checkpoint_path,
        "checkpoint_sha256": version.checkpoint_sha256,
        "aliases": list(aliases),
    }


def describe_fact(fact: Fact) -> dict[str, Any]:
    return {
        "id": fact.id,
        "model_id": fact.model_id,
        "external_id": fact.external_id,
        "question": fact.question,
        "answer": fact.answer,
        "context": fact.context,
        "subject": fact.subject,
        "significance": fact.significance,
        "paraphrases": fact.paraphrases,
        "neighbors": fact.neighbors,
        "status": fact.status.value,
        "source": fact.source,
        "source_line": fact.source_line,
        "content_hash": fact.content_hash,
        "created_at": fact.created_at.isoformat(),
    }


# -- aliases ----------------------------------------------------------------------------


def get_alias(session: Session, model: Model, name: str) -> Alias:
    alias = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == name))
    if alias is None:
        raise NotFoundError(f"model {model.name!r} has no alias {name!r}")
    return alias


def list_aliases(session: Session, *, model: Model | None = None) -> list[Alias]:
    query = select(Alias).join(Model).order_by(Model.name, Alias.name)
    if model is not None:
        query = query.where(Alias.model_id == model.id)
    return list(session.scalars(query))


def set_alias(
    session: Session,
    *,
    name: str,
    version: Version,
    reason: str,
    actor: str,
    expect_revision: int | _Unset | None = UNSET,
) -> Alias:
    """Point alias `name` of the version's model at `version`, recording the move.

    Compare-and-set: with `expect_revision` an int, the move happens only if the alias is still
    at that revision; with None, only if the alias does not exist yet. Without it the move still
    cannot lose a concurrent one: the update is conditional on the revision read here, and a
    lost race raises `AliasConflictError` instead of writing a history that skips a move.
    Rolling back is moving the alias to an older version; versions themselves never change.
    """
    _check_name("alias", name)
    if not reason.strip():
        raise ValueError("moving an alias needs a reason")
    model = version.model
    alias = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == name))
    if alias is None:
        if expect_revision is not UNSET and expect_revision is not None:
            raise AliasConflictError(
                f"alias {name!r} of {model.name!r} does not exist (expected revision {expect_revision})"
            )
        alias = Alias(model_id=model.id, name=name, version_id=version.id, revision=1)
        try:
            with session.begin_nested():
                session.add(alias)
                session.flush()
        except IntegrityError:
            raise AliasConflictError(f"alias {name!r} of {model.name!r} was created concurrently") from None
        previous: int | None = None
    else:
        if expect_revision is None:
            raise AliasConflictError(
                f"alias {name!r} of {model.name!r} already exists (revision {alias.revision})"
            )
        if isinstance(expect_revision, int) and alias.revision != expect_revision:
            raise AliasConflictError(
                f"alias {name!r} of {model.name!r} is at revision {alias.revision}, not {expect_revision}"
            )
        if alias.version_id == version.id:
            return alias
        previous = alias.version_id
        result = session.execute(
            update(Alias)
            .where(Alias.id == alias.id, Alias.revision == alias.revision)
            .values(version_id=version.id, revision=Alias.revision + 1, updated_at=utcnow()),
            execution_options={"synchronize_session": False},
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise AliasConflictError(
                f"alias {name!r} of {model.name!r} was moved concurrently; re-read and retry"
            )
        session.refresh(alias)
    session.add(
        AliasMove(
            alias_id=alias.id,
            from_version_id=previous,
            to_version_id=version.id,
            moved_by=actor,
            reason=reason,
        )
    )
    record_audit(
        session,
        actor=actor,
        action="alias.set",
        object_type="alias",
        object_id=alias.id,
        details={
            "model": model.name,
            "alias": name,
            "from": _number(session, previous),
            "to": version.number,
            "revision": alias.revision,
            "reason": reason,
        },
    )
    return alias


def _number(session: Session, version_id: int | None) -> int | None:
    if version_id is None:
        return None
    return session.scalar(select(Version.number).where(Version.id == version_id))


def alias_history(session: Session, model: Model, name: str) -> list[AliasMove]:
    """Every move of the alias, oldest first."""
    alias = get_alias(session, model, name)
    return list(
        session.scalars(select(AliasMove).where(AliasMove.alias_id == alias.id).order_by(AliasMove.id))
    )
