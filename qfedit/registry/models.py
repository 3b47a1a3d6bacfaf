"""Registered base models and their version 0."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit.db.models import (
    Model,
    Version,
)
from qfedit.errors import ConflictError, InvalidInputError, NotFoundError
from qfedit.registry.audit import record_audit
from qfedit.registry.base import check_name, digest_of_hashes


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
    check_name("model", name)
    if default_layer is not None and default_layer < 0:
        raise InvalidInputError(f"default layer must be >= 0, not {default_layer}")
    if session.scalar(select(Model.id).where(Model.name == name)) is not None:
        raise ConflictError(f"a model named {name!r} is already registered")
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
        model_id=model.id,
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
