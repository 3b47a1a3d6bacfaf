"""The generation server of `qfedit serve`: one model in memory, following an alias.

Thin over `qfedit.serving`: before each generation it lets the `AliasFollower` look at the alias
(at most every `poll_s` seconds) and switch versions; the answer carries the label of the version
whose weights produced it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from qfedit.serving import AliasFollower, PromptTooLongError

MAX_QUESTION_CHARS = 4000
MAX_CONTEXT_CHARS = 16000
MAX_NEW_TOKENS = 512


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


def create_app(follower: AliasFollower) -> FastAPI:
    """The app for a follower that has already loaded its first version (`refresh(force=True)`)."""
    app = FastAPI(
        title="qfedit serve",
        summary=f"Generation from {follower.model_name}@{follower.alias}, following the alias.",
    )

    # Plain `def` routes: FastAPI runs them in its thread pool, so a long generation does not
    # block the event loop, and concurrent ones share the model under its read lock.
    @app.post("/generate")
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
