"""The generation server of `qfedit serve`: one model in memory, following an alias.

Thin over `qfedit.serving`: before each generation it lets the `AliasFollower` look at the alias
(at most every `poll_s` seconds) and switch versions; the answer carries the label of the version
whose weights produced it.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from qfedit.config import ApiToken
from qfedit.serving import AliasFollower, PromptTooLongError

MAX_QUESTION_CHARS = 4000
MAX_CONTEXT_CHARS = 16000
MAX_NEW_TOKENS = 512
# Module level: with postponed annotations, FastAPI resolves dependencies from the module's names.
_bearer = HTTPBearer(auto_error=False)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS)]
    context: Annotated[str | None, Field(max_length=MAX_CONTEXT_CHARS)] = None
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 24


class GenerateResponse(BaseModel):
    answer: str
    version: str = Field(description="The version whose weights produced the answer, e.g. demo@3.")


class Health(BaseModel):
    status: str
    model: str
    alias: str
    version: str
    poll_s: float
    last_error: str | None = Field(description="Why the last look at the alias failed, if it did.")


def create_app(follower: AliasFollower, tokens: Mapping[str, ApiToken] | None = None) -> FastAPI:
    """The app for a follower that has already loaded its first version (`refresh(force=True)`).

    With `tokens`, generation needs one of them as a bearer token (any scope: reading is enough);
    `qfedit serve` passes them whenever it listens beyond the loopback interface."""
    app = FastAPI(
        title="qfedit serve",
        summary=f"Generation from {follower.model_name}@{follower.alias}, following the alias.",
    )

    def authenticate(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if tokens is None:
            return
        presented = (credentials.credentials if credentials is not None else "").encode()
        # Every token compared in constant time, so timing does not reveal a near match.
        matched = [
            hmac.compare_digest(presented, t.token.get_secret_value().encode()) for t in tokens.values()
        ]
        if credentials is None or not any(matched):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    # Plain `def` routes: FastAPI runs them in its thread pool, so a long generation does not
    # block the event loop, and concurrent ones share the model under its read lock.
    @app.post("/generate", dependencies=[Depends(authenticate)])
    def generate(request: GenerateRequest) -> GenerateResponse:
        follower.refresh()
        try:
            reply = follower.versioned.answer(
                request.question, request.context, max_new_tokens=request.max_new_tokens
            )
        except PromptTooLongError as err:
            detail = [{"loc": ["body", err.field], "msg": str(err), "type": "prompt_too_long"}]
            raise HTTPException(status_code=422, detail=detail) from None
        return GenerateResponse(answer=reply.text, version=reply.version)

    @app.get("/healthz")
    def healthz() -> Health:
        described: dict[str, Any] = follower.describe()
        return Health(status="ok", **described)

    return app
