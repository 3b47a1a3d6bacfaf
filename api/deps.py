"""Dependencies: settings, a database session per request, the checkpoint store, and bearer auth.

Auth is declared before any other dependency of a route, so a request without a valid token is
refused (401/403) before anything is looked up or changed.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from qfedit import registry
from qfedit.app.schemas import NAME_PATTERN
from qfedit.config import Settings
from qfedit.db.models import Model
from qfedit.store import CheckpointStore, store_from_settings

Scope = Literal["read", "write", "admin"]
_RANK: dict[str, int] = {"read": 0, "write": 1, "admin": 2}

bearer = HTTPBearer(
    auto_error=False,
    description='Tokens come from `QFEDIT_API_TOKENS` (`{"name": {"token": ..., "scope": "read|write|admin"}}`).',
)


@dataclass(frozen=True)
class Principal:
    """The caller: the token's name is the actor recorded in the audit log."""

    name: str
    scope: Scope

    def allows(self, scope: Scope) -> bool:
        return _RANK[self.scope] >= _RANK[scope]


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(request: Request) -> Iterator[Session]:
    # Routes commit what they change; anything left uncommitted (an error) is rolled back on close.
    with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(settings: SettingsDep) -> CheckpointStore:
    return store_from_settings(settings)


StoreDep = Annotated[CheckpointStore, Depends(get_store)]


def _authenticate(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], settings: SettingsDep
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "a bearer token is required", field="header.Authorization", headers=challenge)
    presented = credentials.credentials.encode()
    found: Principal | None = None
    # Compare against every token in constant time, so timing does not reveal a near match.
    for name, entry in settings.api_tokens.items():
        if hmac.compare_digest(presented, entry.token.get_secret_value().encode()):
            found = Principal(name=name, scope=entry.scope)
    if found is None:
        raise ApiError(401, "the bearer token is not valid", field="header.Authorization", headers=challenge)
    return found


def require(scope: Scope) -> Callable[..., Principal]:
    def check(principal: Annotated[Principal, Depends(_authenticate)]) -> Principal:
        if not principal.allows(scope):
            raise ApiError(
                403,
                f"token {principal.name!r} has scope {principal.scope}; this needs {scope}",
                code="forbidden",
            )
        return principal

    return check


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[\x21-\x7e]{1,200}$",
        description="Retrying with the same key returns the batch the first request made.",
    ),
]


ReadAccess = Annotated[Principal, Depends(require("read"))]
WriteAccess = Annotated[Principal, Depends(require("write"))]


def get_model(
    model: Annotated[str, Path(pattern=NAME_PATTERN, description="Model name.")], session: SessionDep
) -> Model:
    return registry.get_model(session, model)


ModelDep = Annotated[Model, Depends(get_model)]
