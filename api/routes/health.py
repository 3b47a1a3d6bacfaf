"""Liveness and readiness: no token needed, so orchestrators can probe them."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from qfedit.app.schemas import Health, Readiness

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Database and broker reachable",
    responses={503: {"model": Readiness, "description": "Something it needs is unreachable."}},
)
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    detail: dict[str, str] = {}
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = True
    except Exception as err:  # any failure means not ready; the reason goes in the response
        logger.warning("readiness: database unreachable: %s", err)
        database, detail["database"] = False, type(err).__name__
    try:
        broker = bool(state.broker_reachable(state.settings))
    except Exception as err:  # as above: a probe reports, it does not raise
        logger.warning("readiness: broker check failed: %s", err)
        broker, detail["broker"] = False, type(err).__name__
    if not broker and "broker" not in detail:
        detail["broker"] = "unreachable"
    ready = database and broker
    body = Readiness(
        status="ready" if ready else "unavailable", database=database, broker=broker, detail=detail
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
