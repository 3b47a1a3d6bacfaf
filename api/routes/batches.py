"""Edit batches: enqueue (idempotent), status with progress, cancel, list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from api import queue
from api.deps import IdempotencyKey, ModelDep, ReadAccess, SessionDep, WriteAccess
from api.errors import ApiError
from qfedit import registry
from qfedit.app import views
from qfedit.app.schemas import (
    DB_INT_MAX,
    ERROR_RESPONSES,
    NAME_PATTERN,
    BatchOut,
    BatchPage,
    BatchRequest,
    DbId,
)
from qfedit.db.models import BatchStatus
from qfedit.pipeline import lifecycle, submit

router = APIRouter(tags=["batches"])


@router.post(
    "/v1/models/{model}/batches",
    response_model=BatchOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue a batch that edits facts into the model's next version",
    responses=ERROR_RESPONSES,
)
def enqueue_batch(
    request: Request,
    response: Response,
    principal: WriteAccess,
    model: ModelDep,
    session: SessionDep,
    body: BatchRequest,
    idempotency_key: IdempotencyKey = None,
) -> BatchOut:
    limit = request.app.state.settings.api_max_batch_facts
    if body.fact_ids is not None and len(body.fact_ids) > limit:
        raise ApiError(422, f"at most {limit} facts a batch", field="body.fact_ids")
    replayed = registry.batch_id_for_key(session, idempotency_key) is not None
    batch = submit.submit_batch(
        session,
        model=model,
        fact_ids=body.fact_ids,
        requested_by=principal.name,
        idempotency_key=idempotency_key,
        hyperparameters=body.hyperparameters.stored() if body.hyperparameters is not None else None,
        app=request.app.state.settings,
    )
    session.commit()
    queue.send(request, batch)
    if replayed:
        # The key's batch, not a new one: said as Stripe and others say it, 200 not 202.
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return views.batch_out(session, batch)


@router.get(
    "/v1/batches", response_model=BatchPage, summary="List batches, newest first", responses=ERROR_RESPONSES
)
def list_batches(
    _: ReadAccess,
    session: SessionDep,
    model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    batch_status: Annotated[BatchStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
) -> BatchPage:
    found = registry.list_batches(
        session,
        model=registry.get_model(session, model) if model else None,
        status=batch_status,
        limit=limit,
        offset=offset,
    )
    return BatchPage(items=[views.batch_out(session, b) for b in found], limit=limit, offset=offset)


@router.get(
    "/v1/batches/{batch_id}",
    response_model=BatchOut,
    summary="A batch's status and progress",
    responses=ERROR_RESPONSES,
)
def get_batch(_: ReadAccess, session: SessionDep, batch_id: DbId) -> BatchOut:
    return views.batch_out(session, registry.get_batch(session, batch_id))


@router.post(
    "/v1/batches/{batch_id}/cancel",
    response_model=BatchOut,
    summary="Cancel a batch",
    responses=ERROR_RESPONSES,
)
def cancel_batch(principal: WriteAccess, session: SessionDep, batch_id: DbId) -> BatchOut:
    batch = lifecycle.cancel_batch(session, registry.get_batch(session, batch_id), actor=principal.name)
    session.commit()
    return views.batch_out(session, batch)
