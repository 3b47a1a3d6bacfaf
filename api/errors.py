"""One JSON shape for every refusal: `{"error": code, "message": text, "field": where}`.

Library exceptions are translated here, once, by their code (`qfedit.errors.HTTP_STATUS`), so
routes stay thin. An exception that is not a `QFEditError` is a bug: it is answered with a 500
and an error id, and the log has the same id with the traceback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qfedit.errors import HTTP_STATUS, QFEditError
from qfedit.facts import FactError
from qfedit.importing import ImportFileError
from qfedit.store import StoreError

logger = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """A refusal with a code and the request field it is about.

    An HTTPException subclass, so FastAPI passes it through its body parsing unchanged (the body
    size limit raises it from inside `receive`).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code or _CODES.get(status_code, "error")
        self.field = field


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, "field": field, **extra}


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, ApiError):
        code, field = exc.code, exc.field
    else:
        code, field = _CODES.get(exc.status_code, "error"), None
    return JSONResponse(
        error_body(code, str(exc.detail), field), status_code=exc.status_code, headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # `input` and `ctx` are left out: they can hold bytes or exceptions that are not JSON.
    errors = [
        {
            "field": _location(e.get("loc", ())),
            "message": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    if not errors:
        return JSONResponse(error_body("invalid", "invalid request"), status_code=422)
    first = errors[0]
    message = f"{first['field']}: {first['message']}"
    return JSONResponse(error_body("invalid", message, first["field"], errors=errors), status_code=422)


def _translate(
    status: int, code: str, field: str | None = None
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        field_name = field
        if isinstance(exc, FactError):
            field_name = f"body.{exc.field}"
        return JSONResponse(error_body(code, str(exc), field_name), status_code=status)

    return handler


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value (out of range, unstorable text): the input's fault, not ours.
    logger.info("database refused a value: %s", exc)
    return JSONResponse(
        error_body("invalid", "a value in the request cannot be stored by the database"), status_code=422
    )


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    # The store's own message names server paths: it goes to the log, under an id, not to callers.
    error_id = uuid.uuid4().hex[:12]
    logger.error("checkpoint store error %s: %s", error_id, exc)
    message = f"the checkpoint store could not give a verified file ({type(exc).__name__}, error {error_id})"
    return JSONResponse(error_body("store_error", message, error_id=error_id), status_code=500)


async def _qfedit_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QFEditError)
    # The library names fields as it knows them; those it is handed come from the request body,
    # but for the stored model settings a request runs with (`model.settings.*`).
    field = exc.field
    if field is not None and not field.startswith(("body.", "query.", "path.", "header.", "model.")):
        field = f"body.{field}"
    return JSONResponse(error_body(exc.code.value, str(exc), field), status_code=HTTP_STATUS[exc.code])


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body(
            "internal", f"internal error {error_id}; the server log has the details", error_id=error_id
        ),
        status_code=500,
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Starlette picks the most specific class: these two keep their older codes and fields.
    app.add_exception_handler(ImportFileError, _translate(422, "invalid", "body"))
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(QFEditError, _qfedit_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(Exception, _bug)
