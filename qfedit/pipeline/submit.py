"""Asking for work: edit batches, retractions, and the nightly batch of pending facts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit.config import Settings, get_settings
from qfedit.db.models import Batch, BatchKind, FactCapture, FactRow, FactStatus, Model
from qfedit.errors import InvalidInputError
from qfedit.pipeline import captures
from qfedit.pipeline.preflight import check_runnable
from qfedit.pipeline.settings import check_overrides, model_settings
from qfedit.registry.batches import batch_for_key, create_batch, request_digest
from qfedit.registry.models import list_models

logger = logging.getLogger(__name__)


class NothingPendingError(InvalidInputError):
    """A batch of "every pending fact" of a model that has none."""


def submit_batch(
    session: Session,
    *,
    model: Model,
    fact_ids: Sequence[int] | None,
    requested_by: str,
    idempotency_key: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    app: Settings | None = None,
) -> Batch:
    """A queued edit batch; `fact_ids=None` takes every pending fact of the model.

    `hyperparameters` override the model's settings for this batch (validated here, so a typo is
    refused at submission rather than failing the batch later). Only edit settings may be
    overridden (`check_overrides`). Settings an edit cannot run with are refused here, before
    any capture (`check_runnable`); `app` gives the corpus roots (default: the environment's)."""
    check_overrides(hyperparameters)
    settings = model_settings(model, hyperparameters)
    check_runnable(settings, source=model.source, app=app or get_settings(), field="model.settings")
    # The key is bound to the request as sent: "every pending fact" is resolved only once.
    digest = request_digest(model, BatchKind.EDIT, fact_ids, hyperparameters)
    if idempotency_key is not None:
        existing = batch_for_key(session, idempotency_key, digest, model)
        if existing is not None:
            return existing
    if fact_ids is None:
        fact_ids = list(
            session.scalars(
                select(FactRow.id).where(FactRow.model_id == model.id, FactRow.status == FactStatus.PENDING)
            )
        )
        # Facts a capture found the model cannot be taught, or refused as too large for it, stay
        # pending (named on their batch); "every pending fact" leaves them out, or every nightly
        # batch would fail on them again. Refused ones have nothing to include, whatever the settings.
        query = (
            select(FactCapture.fact_id)
            .join(FactRow, FactRow.id == FactCapture.fact_id)
            .where(
                FactRow.model_id == model.id,
                FactRow.status == FactStatus.PENDING,
                FactCapture.layer == settings.edit.layer,
                FactCapture.fingerprint == model.fingerprint,
                FactCapture.teachable.is_(False),
            )
        )
        if settings.unteachable == "include":
            query = query.where(FactCapture.object_path == captures.REFUSED)
        left_out = set(session.scalars(query))
        fact_ids = [fact_id for fact_id in fact_ids if fact_id not in left_out]
        if not fact_ids:
            raise NothingPendingError(
                f"model {model.name!r} has no pending facts to edit (unteachable ones aside)",
                field="fact_ids",
            )
    return create_batch(
        session,
        model=model,
        fact_ids=fact_ids,
        requested_by=requested_by,
        hyperparameters=hyperparameters,
        settings=settings.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        digest=digest,
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
        raise InvalidInputError("a retraction needs a reason", field="reason")
    return create_batch(
        session,
        model=model,
        fact_ids=fact_ids,
        settings=model_settings(model, field="model.settings").model_dump(mode="json"),
        requested_by=requested_by,
        idempotency_key=idempotency_key,
        kind=BatchKind.RETRACT,
        reason=reason,
    )


def nightly_batches(
    session: Session, day: str, *, actor: str = "qfedit-beat", app: Settings | None = None
) -> list[Batch]:
    """One batch of pending facts per model, keyed by model and day: re-runs make no second batch.
    A model whose settings cannot edit is skipped and logged; the others still get their batch."""
    batches = []
    for model in list_models(session):
        key = f"nightly:{model.name}:{day}"
        try:
            batches.append(
                submit_batch(
                    session, model=model, fact_ids=None, requested_by=actor, idempotency_key=key, app=app
                )
            )
        except NothingPendingError:
            continue
        except InvalidInputError as error:
            logger.warning("nightly batch of model %r not submitted: %s", model.name, error)
    return batches
