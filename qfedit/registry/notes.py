"""What people say about models and versions, as MLflow's registry lets them: an editable
description and tags on each, and archived versions. Every change is audited; a version's own row
never changes (its note is a row beside it), and archiving deletes nothing: an archived version
leaves listings by default, keeps its checkpoint and can be restored."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit.db.models import Alias, Model, Version, VersionNote, utcnow
from qfedit.errors import ConflictError, InvalidInputError
from qfedit.registry.audit import record_audit
from qfedit.registry.base import UNSET, _Unset

MAX_DESCRIPTION_CHARS = 4000
MAX_TAGS = 32
MAX_TAG_VALUE_CHARS = 256
TAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"


def _tags(current: Mapping[str, Any], set_tags: Mapping[str, str], remove: Iterable[str]) -> dict[str, str]:
    tags = {str(k): str(v) for k, v in current.items()}
    for key in remove:
        if key not in tags:
            raise InvalidInputError(f"tag {key!r}: not set, nothing to remove", field="remove_tags")
        del tags[key]
    for key, value in set_tags.items():
        if not re.fullmatch(TAG_KEY_PATTERN, key):
            raise InvalidInputError(
                f"tag {key!r}: a key is a letter or digit, then up to 63 letters, digits or _.:/-",
                field=f"tags.{key}" if key.isidentifier() else "tags",
            )
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE_CHARS:
            raise InvalidInputError(
                f"tag {key!r}: the value must be text of at most {MAX_TAG_VALUE_CHARS} characters",
                field=f"tags.{key}",
            )
        tags[key] = value
    if len(tags) > MAX_TAGS:
        raise InvalidInputError(f"at most {MAX_TAGS} tags, not {len(tags)}", field="tags")
    return tags


def _description(value: str | None) -> str | None:
    if value is not None and len(value) > MAX_DESCRIPTION_CHARS:
        raise InvalidInputError(
            f"description: {len(value)} characters, at most {MAX_DESCRIPTION_CHARS}", field="description"
        )
    return value or None


def describe_model(
    session: Session,
    model: Model,
    *,
    actor: str,
    description: str | _Unset | None = UNSET,
    tags: Mapping[str, str] | None = None,
    remove_tags: Iterable[str] = (),
) -> Model:
    """Change a model's description (None clears it) and tags. Does not commit."""
    before = {"description": model.description, "tags": dict(model.tags or {})}
    if not isinstance(description, _Unset):
        model.description = _description(description)
    model.tags = _tags(model.tags or {}, tags or {}, remove_tags)
    after = {"description": model.description, "tags": dict(model.tags)}
    if after != before:
        record_audit(
            session,
            actor=actor,
            action="model.described",
            object_type="model",
            object_id=model.id,
            model_id=model.id,
            details={"before": before, "after": after},
        )
    return model


def _note(session: Session, version: Version, actor: str) -> VersionNote:
    note = session.get(VersionNote, version.id)
    if note is None:
        note = VersionNote(version_id=version.id, tags={}, updated_by=actor)
        session.add(note)
    return note


def describe_version(
    session: Session,
    version: Version,
    *,
    actor: str,
    description: str | _Unset | None = UNSET,
    tags: Mapping[str, str] | None = None,
    remove_tags: Iterable[str] = (),
) -> VersionNote:
    """Change a version's description (None clears it) and tags. Does not commit."""
    note = _note(session, version, actor)
    before = {"description": note.description, "tags": dict(note.tags or {})}
    if not isinstance(description, _Unset):
        note.description = _description(description)
    note.tags = _tags(note.tags or {}, tags or {}, remove_tags)
    note.updated_by = actor
    after = {"description": note.description, "tags": dict(note.tags)}
    if after != before:
        record_audit(
            session,
            actor=actor,
            action="version.described",
            object_type="version",
            object_id=version.id,
            model_id=version.model_id,
            details={"version": version.label, "before": before, "after": after},
        )
    session.flush()
    return note


def archive_version(
    session: Session, version: Version, *, actor: str, reason: str, archived: bool = True
) -> VersionNote:
    """Archive a version (or restore it, `archived=False`). An alias's version cannot be archived:
    move the alias first. Nothing is deleted. Does not commit."""
    if not reason.strip():
        raise InvalidInputError("archiving a version needs a reason", field="reason")
    if archived:
        held = sorted(
            session.scalars(
                select(Alias.name).where(Alias.version_id == version.id, Alias.model_id == version.model_id)
            )
        )
        if held:
            raise ConflictError(
                f"{version.label} is where alias {', '.join(held)} points: move the alias first",
                field="version",
            )
    note = _note(session, version, actor)
    if (note.archived_at is not None) == archived:
        return note
    note.archived_at = utcnow() if archived else None
    note.updated_by = actor
    record_audit(
        session,
        actor=actor,
        action="version.archived" if archived else "version.restored",
        object_type="version",
        object_id=version.id,
        model_id=version.model_id,
        details={"version": version.label, "reason": reason},
    )
    session.flush()
    return note
