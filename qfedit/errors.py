"""The errors qfedit raises on purpose, each with a code that every edge translates the same way.

    try:
        registry.get_model(session, "qwen")
    except QFEditError as error:
        EXIT_CODES[error.code], HTTP_STATUS[error.code]   # 3, 404

An error that is not a `QFEditError` is a bug: the API answers it with a 500 and an error id that
the log repeats with the traceback, the CLI shows the traceback, and the worker fails its batch.
Only `TransientError` is worth retrying: everything else fails the same way the next time.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(str, enum.Enum):
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID = "invalid"
    PERMANENT = "failed"
    TRANSIENT = "unavailable"


# The one table from code to HTTP status and CLI exit status (1 is left to crashes, 2 to usage
# errors that the command-line parser reports itself).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.INVALID: 422,
    ErrorCode.PERMANENT: 500,
    ErrorCode.TRANSIENT: 503,
}
EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.INVALID: 2,
    ErrorCode.NOT_FOUND: 3,
    ErrorCode.CONFLICT: 4,
    ErrorCode.PERMANENT: 5,
    ErrorCode.TRANSIENT: 6,
}


class QFEditError(Exception):
    """An expected failure; `field` names the input it is about, when one is."""

    code: ClassVar[ErrorCode] = ErrorCode.PERMANENT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFoundError(QFEditError, LookupError):
    """A model, version, alias, batch or fact that does not exist."""

    code = ErrorCode.NOT_FOUND


class ConflictError(QFEditError):
    """A change that collides with the current state: a moved alias, a final batch, a used key."""

    code = ErrorCode.CONFLICT


class InvalidInputError(QFEditError, ValueError):
    """Input that can never be accepted as it is: the message says which field and why.

    A `ValueError`, so code that validates with the standard exception keeps working."""

    code = ErrorCode.INVALID


class PermanentError(QFEditError):
    """Work that cannot succeed however often it is retried (a fact the model cannot capture,
    an ill-conditioned system, a model without an edit layer)."""

    code = ErrorCode.PERMANENT


class TransientError(QFEditError):
    """Work that may succeed later (a store or database that did not answer)."""

    code = ErrorCode.TRANSIENT
