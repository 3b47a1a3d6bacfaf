"""Domain objects as response bodies (the queries a view needs, and nothing else).

The one owner of how a row looks from outside: the API answers with these models and the CLI's
`--json` prints the same ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.app.schemas import (
    AliasMoveOut,
    AliasOut,
    AuditOut,
    BatchOut,
    FactDetail,
    FactOut,
    FactUpdate,
    MetricChange,
    ModelOut,
    UnteachableFact,
    VersionDetail,
    VersionDiffOut,
    VersionOut,
    VersionRefOut,
)
from qfedit.db.models import Alias, AliasMove, AuditEntry, Batch, BatchKind, FactRow, Model, Version
from qfedit.errors import QFEditError
from qfedit.pipeline import captures, lifecycle
from qfedit.pipeline.settings import batch_settings


def model_out(model: Model) -> ModelOut:
    return ModelOut.model_validate(model)


def audit_out(entry: AuditEntry) -> AuditOut:
    return AuditOut.model_validate(entry)


def fact_out(fact: FactRow) -> FactOut:
    return FactOut(
        id=fact.id,
        model_id=fact.model_id,
        external_id=fact.external_id,
        question=fact.question,
        answer=fact.answer,
        context=fact.context,
        subject=fact.subject,
        significance=fact.significance,
        paraphrases=fact.paraphrases,
        neighbors=fact.neighbors,
        status=fact.status.value,
        superseded_by=fact.superseded_by_id,
        source=fact.source,
        source_line=fact.source_line,
        content_hash=fact.content_hash,
        created_at=fact.created_at,
    )


def fact_preview_out(preview: registry.FactPreview) -> FactOut:
    """A fact as a list shows it: its text cut to a preview's size, the cut fields named."""
    fact = preview.row
    return FactOut(
        id=fact.id,
        model_id=fact.model_id,
        external_id=fact.external_id,
        question=preview.question,
        answer=preview.answer,
        context=preview.context,
        subject=preview.subject,
        significance=fact.significance,
        paraphrases=preview.paraphrases,
        neighbors=preview.neighbors,
        status=fact.status.value,
        superseded_by=fact.superseded_by_id,
        source=fact.source,
        source_line=fact.source_line,
        content_hash=fact.content_hash,
        created_at=fact.created_at,
        truncated=list(preview.cut),
    )


def fact_detail(session: Session, fact: FactRow) -> FactDetail:
    versions = [
        VersionRefOut(number=v.number, label=v.label) for v in registry.versions_with_fact(session, fact)
    ]
    supersedes = sorted(session.scalars(select(FactRow.id).where(FactRow.superseded_by_id == fact.id)))
    return FactDetail(
        **fact_out(fact).model_dump(), model=fact.model.name, supersedes=supersedes, versions=versions
    )


def batch_out(session: Session, batch: Batch) -> BatchOut:
    version = registry.version_of_batch(session, batch)
    progress = lifecycle.batch_progress(session, batch)
    return BatchOut(
        id=batch.id,
        model=batch.model.name,
        kind=batch.kind.value,
        status=batch.status.value,
        progress=batch.progress,
        attempts=batch.attempts,
        error=batch.error,
        waiting=batch.waiting,
        activity=batch.activity,
        elapsed_s=round(lifecycle.elapsed_s(batch), 1),
        reason=batch.reason,
        requested_by=batch.requested_by,
        idempotency_key=batch.idempotency_key,
        hyperparameters=batch.hyperparameters,
        settings=batch.settings,
        fact_count=progress.facts,
        captured=progress.captured,
        version=version.label if version is not None else None,
        unteachable=[
            UnteachableFact(fact_id=e["fact_id"], context_answer=e["context_answer"], reason=e["reason"])
            for e in _unteachable(session, batch)[:100]
        ],
        excluded=[int(e["fact_id"]) for e in batch.excluded_facts or []],
        superseded=version.metrics.get("superseded") if version is not None else None,
        created_at=batch.created_at,
        updated_at=batch.updated_at,
        started_at=batch.started_at,
        finished_at=batch.finished_at,
    )


def _unteachable(session: Session, batch: Batch) -> list[dict[str, Any]]:
    if batch.kind != BatchKind.EDIT:
        return []
    try:
        layer = batch_settings(batch).edit.layer
    except QFEditError:  # settings that no longer validate are reported by the batch's own error
        return []
    return captures.unteachable(
        session, registry.batch_fact_ids(session, batch), layer, batch.model.fingerprint
    )


def version_out(version: Version, aliases: Sequence[str] = ()) -> VersionOut:
    return VersionOut(
        id=version.id,
        model=version.model.name,
        number=version.number,
        label=version.label,
        parent=version.parent.number if version.parent is not None else None,
        batch=version.batch_id,
        created_at=version.created_at,
        created_by=version.created_by,
        reason=version.reason,
        layer=version.layer,
        rule=version.rule,
        hyperparameters=version.hyperparameters,
        relative_update_norm=version.relative_update_norm,
        metrics=version.metrics,
        fact_count=version.fact_count,
        fact_set_digest=version.fact_set_digest,
        checkpoint_path=version.checkpoint_path,
        checkpoint_sha256=version.checkpoint_sha256,
        aliases=list(aliases),
        description=version.note.description if version.note is not None else None,
        tags=dict(version.note.tags or {}) if version.note is not None else {},
        archived=version.archived,
    )


def version_detail(session: Session, version: Version) -> VersionDetail:
    aliases = registry.aliases_by_version(session, version.model).get(version.id, [])
    facts = registry.version_fact_ids(session, version)
    parent = registry.version_fact_ids(session, version.parent) if version.parent is not None else set()
    return VersionDetail(
        **version_out(version, aliases).model_dump(),
        facts_added=len(facts - parent),
        facts_removed=len(parent - facts),
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


def diff_out(diff: registry.VersionDiff, limit: int | None = None) -> VersionDiffOut:
    """At most `limit` facts of each side (all of them with None); the totals are exact."""
    return VersionDiffOut(
        old=diff.old.label,
        new=diff.new.label,
        facts_added_total=len(diff.added),
        facts_removed_total=len(diff.removed),
        facts_added=[fact_out(f) for f in diff.added[:limit]],
        facts_removed=[fact_out(f) for f in diff.removed[:limit]],
        facts_updated_total=len(diff.updated),
        facts_updated=[FactUpdate(old=fact_out(a), new=fact_out(b)) for a, b in diff.updated[:limit]],
        metric_changes={k: MetricChange(old=a, new=b) for k, (a, b) in diff.metric_changes.items()},
        weight_difference_norm=diff.weight_difference_norm,
    )
