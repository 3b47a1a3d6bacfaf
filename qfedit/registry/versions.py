"""Immutable weight versions: recording, resolving references, fact sets, differences."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qfedit.db.models import (
    Alias,
    Batch,
    FactCapture,
    FactRow,
    Model,
    Version,
    VersionFact,
    VersionNote,
)
from qfedit.errors import InvalidInputError, NotFoundError, TransientError
from qfedit.registry.audit import record_audit
from qfedit.registry.base import chunks, digest_of_hashes
from qfedit.registry.facts import facts_of_model, load_facts
from qfedit.registry.models import get_model, list_models
from qfedit.store import CheckpointStore, StoredObject

# Each lost race means another writer took a number; enough for a crowd of concurrent writers.
_NUMBER_ATTEMPTS = 64


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
        raise InvalidInputError("a version needs a reason")
    if parent is not None and parent.model_id != model.id:
        raise InvalidInputError(f"parent {parent.label} belongs to another model than {model.name!r}")
    if batch is not None and batch.model_id != model.id:
        raise InvalidInputError(f"batch {batch.id} belongs to another model than {model.name!r}")
    hashes = facts_of_model(session, model, fact_ids)
    if parent is None:
        parent = latest_version(session, model)
    for _attempt in range(_NUMBER_ATTEMPTS):
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
            # The savepoint's rollback already took the pending row out of the session; the next
            # attempt reads the new highest number.
            if version in session:
                session.expunge(version)
            continue
        break
    else:
        raise TransientError(
            f"could not allocate a version number for {model.name!r} after {_NUMBER_ATTEMPTS} attempts"
        )
    ids = sorted(hashes)
    for chunk in chunks(ids):
        session.execute(
            insert(VersionFact), [{"version_id": version.id, "fact_id": fact_id} for fact_id in chunk]
        )
    record_audit(
        session,
        actor=created_by,
        action="version.create",
        object_type="version",
        object_id=version.id,
        model_id=version.model_id,
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


def list_versions(session: Session, *, model: Model | None = None, archived: bool = True) -> list[Version]:
    """Versions by model and number; `archived=False` leaves out the archived ones."""
    query = select(Version).join(Model).order_by(Model.name, Version.number)
    if model is not None:
        query = query.where(Version.model_id == model.id)
    if not archived:
        query = query.outerjoin(VersionNote, VersionNote.version_id == Version.id).where(
            VersionNote.archived_at.is_(None)
        )
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


def versions_with_fact(session: Session, fact: FactRow) -> list[Version]:
    """Every version whose fact set holds `fact`, oldest first."""
    return list(
        session.scalars(
            select(Version)
            .join(VersionFact, VersionFact.version_id == Version.id)
            .where(VersionFact.fact_id == fact.id)
            .order_by(Version.number)
        )
    )


def get_fact(session: Session, fact_id: int) -> FactRow:
    fact = session.get(FactRow, fact_id)
    if fact is None:
        raise NotFoundError(f"no fact {fact_id}")
    return fact


def version_fact_ids(session: Session, version: Version) -> set[int]:
    return set(session.scalars(select(VersionFact.fact_id).where(VersionFact.version_id == version.id)))


@dataclass
class VersionDiff:
    old: Version
    new: Version
    added: list[FactRow]
    removed: list[FactRow]
    updated: list[tuple[FactRow, FactRow]] = field(default_factory=list)
    """`(older, newer)`: a removed fact superseded by an added one, shown as one change."""
    metric_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    weight_difference_norm: float | None = None  # Frobenius norm of delta(new) - delta(old)


def diff_versions(
    session: Session, old: Version, new: Version, *, store: CheckpointStore | None = None
) -> VersionDiff:
    """Facts added and removed, metrics that changed, and (with `store`) the norm of the weight difference."""
    if old.model_id != new.model_id:
        raise InvalidInputError(f"{old.label} and {new.label} are versions of different models")
    old_ids, new_ids = version_fact_ids(session, old), version_fact_ids(session, new)
    changes = {
        key: (old.metrics.get(key), new.metrics.get(key))
        for key in sorted(set(old.metrics) | set(new.metrics))
        if old.metrics.get(key) != new.metrics.get(key)
    }
    added = load_facts(session, new_ids - old_ids)
    removed = load_facts(session, old_ids - new_ids)
    added_by_id = {row.id: row for row in added}
    updated = [
        (row, added_by_id[row.superseded_by_id]) for row in removed if row.superseded_by_id in added_by_id
    ]
    replaced = {old_row.id for old_row, _ in updated} | {new_row.id for _, new_row in updated}
    diff = VersionDiff(
        old=old,
        new=new,
        added=[row for row in added if row.id not in replaced],
        removed=[row for row in removed if row.id not in replaced],
        updated=updated,
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
            raise InvalidInputError(
                f"parameter {name}: delta shapes {tuple(a.shape)} and {tuple(b.shape)} differ"
            )
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
