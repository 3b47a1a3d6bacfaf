"""Handing a committed batch to the broker (after the commit: a worker must find the row)."""

from __future__ import annotations

import logging

from fastapi import Request

from api.errors import ApiError
from qfedit.db.models import Batch, BatchStatus

logger = logging.getLogger(__name__)


def send(request: Request, batch: Batch) -> None:
    """Enqueue a queued batch; a batch past `queued` is already with a worker and is not sent again.

    A replayed request (same Idempotency-Key) sends a still-queued batch again: tasks are
    idempotent, and this is how a client recovers from a broker that was down the first time.
    """
    if batch.status != BatchStatus.QUEUED:
        return
    state = request.app.state
    try:
        state.enqueue_batch(batch.id, state.settings)
    except Exception as err:  # the broker client raises many kinds; each means "not sent"
        logger.warning("batch %s recorded but not sent to the broker: %s", batch.id, err)
        raise ApiError(
            503,
            f"batch {batch.id} is recorded but the broker is unreachable ({type(err).__name__}); "
            "retry with the same Idempotency-Key",
            code="broker_unavailable",
        ) from None
