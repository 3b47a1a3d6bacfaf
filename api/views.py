"""Domain objects as response bodies (the queries a view needs, and nothing else)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.schemas import AliasMoveOut, AliasOut, BatchOut, FactDetail, FactOut, VersionDetail, VersionRefOut
from qfedit import registry
from qfedit.db.models import Alias, AliasMove, Batch, FactRow, Version


def fact_out(fact: FactRow) -> FactOut:
    return FactOut.model_validate(registry.describe_fact(fact))


def fact_detail(session: Session, fact: FactRow) -> FactDetail:
    versions = [
        VersionRefOut(number=v.number, label=v.label) for v in registry.versions_with_fact(session, fact)
    ]
    return FactDetail.model_validate(
        {**registry.describe_fact(fact), "model": fact.model.name, "versions": versions}
    )


def batch_out(session: Session, batch: Batch) -> BatchOut:
    version = registry.version_of_batch(session, batch)
    return BatchOut(
        id=batch.id,
        model=batch.model.name,
        kind=batch.kind.value,
        status=batch.status.value,
        progress=batch.progress,
        attempts=batch.attempts,
        error=batch.error,
        reason=batch.reason,
        requested_by=batch.requested_by,
        idempotency_key=batch.idempotency_key,
        hyperparameters=batch.hyperparameters,
        fact_count=registry.batch_fact_count(session, batch),
        version=version.label if version is not None else None,
        created_at=batch.created_at,
        updated_at=batch.updated_at,
        started_at=batch.started_at,
        finished_at=batch.finished_at,
    )


def version_detail(session: Session, version: Version) -> VersionDetail:
    aliases = registry.aliases_by_version(session, version.model).get(version.id, [])
    facts = registry.version_fact_ids(session, version)
    parent = registry.version_fact_ids(session, version.parent) if version.parent is not None else set()
    return VersionDetail.model_validate(
        {
            **registry.describe_version(version, aliases),
            "facts_added": len(facts - parent),
            "facts_removed": len(parent - facts),
        }
    )


def alias_out(alias: Alias) -> AliasOut:
    return AliasOut(
        model=alias.model.name,
        name=alias.name,
        version=alias.version.number,
        label=alias.version.label,
        revision=alias.revision,
        updated_at=alias.updated_at,
    )


def alias_move_out(move: AliasMove) -> AliasMoveOut:
    return AliasMoveOut(
        moved_at=move.moved_at,
        moved_by=move.moved_by,
        from_version=move.from_version.number if move.from_version is not None else None,
        to_version=move.to_version.number,
        reason=move.reason,
    )
