"""The append-only audit log: who changed what, when and why."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit.db.models import Alias, AuditEntry, Model, Version


def record_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_id: str | int,
    details: dict[str, Any] | None = None,
    model_id: int | None,
) -> AuditEntry:
    entry = AuditEntry(
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        details=details or {},
        model_id=model_id,
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
    until: datetime | None = None,
    model: Model | None = None,
    before: int | None = None,
    limit: int | None = 100,
) -> list[AuditEntry]:
    """Newest first. `action` matches a prefix, so `alias` finds `alias.set`; `before` pages
    (entries with a smaller id); `until` is exclusive."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc())
    if model is not None:
        query = query.where(AuditEntry.model_id == model.id)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    if until is not None:
        query = query.where(AuditEntry.at < until)
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


def object_names(session: Session, entries: list[AuditEntry]) -> dict[int, str]:
    """What each entry is about, named as everywhere else: `tiny@3` for a version, `tiny@production`
    for an alias, `tiny` for a model, `batch 5`, `fact 12` for the rest (by entry id)."""

    def ids(kind: str) -> set[int]:
        return {int(e.object_id) for e in entries if e.object_type == kind and e.object_id.isdigit()}

    names: dict[tuple[str, str], str] = {}
    if wanted := ids("version"):
        for version in session.scalars(select(Version).where(Version.id.in_(wanted))):
            names["version", str(version.id)] = version.label
    if wanted := ids("alias"):
        for alias in session.scalars(select(Alias).where(Alias.id.in_(wanted))):
            names["alias", str(alias.id)] = f"{alias.model.name}@{alias.name}"
    if wanted := ids("model"):
        for model in session.scalars(select(Model).where(Model.id.in_(wanted))):
            names["model", str(model.id)] = model.name
    return {e.id: names.get((e.object_type, e.object_id), f"{e.object_type} {e.object_id}") for e in entries}
