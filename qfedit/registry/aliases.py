"""Movable aliases (`head`, `production`): compare-and-set moves with their history."""

from __future__ import annotations

import re

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qfedit.db.models import (
    Alias,
    AliasMove,
    Model,
    Version,
    utcnow,
)
from qfedit.errors import ConflictError, InvalidInputError, NotFoundError
from qfedit.registry.audit import record_audit
from qfedit.registry.base import UNSET, _Unset

HEAD = "head"
"""Moves to every version a batch publishes."""
PRODUCTION = "production"
"""Moves only when a version passes the model's `promote` thresholds, or by an admin: what serving
follows by default."""

# One case and no punctuation that reads as nothing: `Production`, `PRODUCTION` and
# `production.` cannot sit beside `production` looking like it. The API's path uses it too.
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"


def check_alias_name(name: str) -> str:
    # fullmatch: with `match`, `$` also matches before a trailing newline.
    if not re.fullmatch(ALIAS_PATTERN, name):
        raise InvalidInputError(
            f"alias name {name!r}: use a lowercase letter, then up to 63 lowercase letters, digits, "
            "'_' or '-'"
        )
    return name


def aliases_by_version(session: Session, model: Model | None = None) -> dict[int, list[str]]:
    query = select(Alias.version_id, Alias.name).order_by(Alias.name)
    if model is not None:
        query = query.where(Alias.model_id == model.id)
    found: dict[int, list[str]] = {}
    for version_id, name in session.execute(query):
        found.setdefault(version_id, []).append(name)
    return found


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
    lost race raises `ConflictError` instead of writing a history that skips a move.
    Rolling back is moving the alias to an older version; versions themselves never change.
    """
    check_alias_name(name)
    if not reason.strip():
        raise InvalidInputError("moving an alias needs a reason")
    if version.archived:
        raise ConflictError(f"{version.label} is archived: restore it before an alias points at it")
    model = version.model
    alias = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == name))
    if alias is None:
        if expect_revision is not UNSET and expect_revision is not None:
            raise ConflictError(
                f"alias {name!r} of {model.name!r} does not exist (expected revision {expect_revision})"
            )
        alias = Alias(model_id=model.id, name=name, version_id=version.id, revision=1)
        try:
            with session.begin_nested():
                session.add(alias)
                session.flush()
        except IntegrityError:
            raise ConflictError(f"alias {name!r} of {model.name!r} was created concurrently") from None
        previous: int | None = None
    else:
        if expect_revision is None:
            raise ConflictError(
                f"alias {name!r} of {model.name!r} already exists (revision {alias.revision})"
            )
        if isinstance(expect_revision, int) and alias.revision != expect_revision:
            raise ConflictError(
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
            raise ConflictError(f"alias {name!r} of {model.name!r} was moved concurrently; re-read and retry")
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
        model_id=model.id,
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
