"""The generation server of `qfedit serve`: one model in memory, following an alias.

Thin over `qfedit.serving`: before each generation it lets the `AliasFollower` look at the alias
(at most every `poll_s` seconds) and switch versions; the answer carries the label of the version
whose weights produced it.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from qfedit.capture import chat_prompt
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


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_CONTEXT_CHARS)]


class ChatRequest(BaseModel):
    """OpenAI's chat completion request, the part a greedy QF answerer can honour; other fields
    OpenAI clients send (temperature, top_p, user, ...) are accepted and ignored: decoding is greedy."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="NAME@ALIAS or NAME@N this server serves, or the version it is on")
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=8)]
    max_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: Literal[False] = False


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

    served = f"{follower.model_name}@{follower.alias}"

    @app.exception_handler(_OpenAIError)
    async def openai_error(request: Request, exc: _OpenAIError) -> JSONResponse:
        return JSONResponse({"error": exc.body}, status_code=exc.status)

    # OpenAI-compatible: existing clients (the `openai` package, LangChain, curl scripts) talk to a
    # version as to any chat model. The system messages are the context, as in QF's teacher.
    @app.get("/v1/models", dependencies=[Depends(authenticate)])
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served, "object": "model", "owned_by": "qfedit"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authenticate)])
    def chat_completions(request: ChatRequest) -> dict[str, Any]:
        follower.refresh()
        if request.model not in (served, follower.versioned.version):
            raise _OpenAIError(
                404,
                f"model {request.model!r} is not served here; this server serves {served} "
                f"(now {follower.versioned.version})",
                "model_not_found",
                "model",
            )
        question, context = _question_and_context(request.messages)
        limit = request.max_completion_tokens or request.max_tokens or 24
        try:
            reply = follower.versioned.answer(question, context, max_new_tokens=limit)
        except PromptTooLongError as err:
            raise _OpenAIError(400, str(err), "context_length_exceeded", "messages") from None
        tokenizer = follower.versioned.loaded.tokenizer
        completion = reply.tokens
        prompt = len(
            tokenizer(chat_prompt(tokenizer, question, context), add_special_tokens=False)["input_ids"]
        )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.version,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": "stop" if reply.stopped else "length",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    @app.get("/healthz")
    def healthz() -> Health:
        described: dict[str, Any] = follower.describe()
        return Health(status="ok", **described)

    return app


class _OpenAIError(Exception):
    """An error in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), which its
    clients turn into their own exception types."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.body = {"message": message, "type": kind, "param": param, "code": code}


def _question_and_context(messages: list[ChatMessage]) -> tuple[str, str | None]:
    """The last message is the question (a user's); system (or developer) messages before it are the
    context. The answerer is single-turn, as QF's transcripts are: earlier turns are refused, not
    silently dropped."""
    *before, last = messages
    if last.role != "user" or not last.content.strip():
        raise _OpenAIError(
            400, "the last message must be a non-empty user message", "invalid_messages", "messages"
        )
    if any(m.role not in ("system", "developer") for m in before):
        raise _OpenAIError(
            400,
            "only system messages may come before the question: this server answers single-turn",
            "invalid_messages",
            "messages",
        )
    if len(last.content) > MAX_QUESTION_CHARS:
        raise _OpenAIError(
            400,
            f"the question is longer than {MAX_QUESTION_CHARS} characters",
            "invalid_messages",
            "messages",
        )
    context = "\n".join(m.content for m in before if m.content.strip())
    return last.content, context or None
