"""The generation server of `qfedit serve`: one model in memory, following an alias.

Thin over `qfedit.serving`: before each generation it lets the `AliasFollower` look at the alias
(at most every `poll_s` seconds) and switch versions; the answer carries the label of the version
whose weights produced it.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from api.limits import BodyLimit
from qfedit.app.schemas import Text
from qfedit.capture import conversation_prompt
from qfedit.config import ApiToken
from qfedit.generate import Streamed
from qfedit.serving import AliasFollower, PromptTooLongError, VersionedModel

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 4000
MAX_CONTEXT_CHARS = 16000
MAX_NEW_TOKENS = 512
MAX_BODY_BYTES = 1 << 20
"""The API's default body limit (`QFEDIT_API_MAX_BODY_BYTES`); `qfedit serve` passes the setting."""
# Open without a token, as the API's: probes and the description of the routes.
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
OPENAI_PREFIX = "/v1/"


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: Annotated[Text, Field(min_length=1, max_length=MAX_QUESTION_CHARS)]
    context: Annotated[Text | None, Field(max_length=MAX_CONTEXT_CHARS)] = None
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 24


class GenerateResponse(BaseModel):
    answer: str
    version: str = Field(description="The version whose weights produced the answer, e.g. demo@3.")


class TextPart(BaseModel):
    """A content part of OpenAI's message; a chat model of text reads text parts only."""

    type: Literal["text"]
    text: Annotated[Text, Field(max_length=MAX_CONTEXT_CHARS)]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    # `Text`: a lone surrogate (JSON's `\ud800`) cannot be tokenized; it is refused, not a 500.
    content: (
        Annotated[Text, Field(max_length=MAX_CONTEXT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)]
    )
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


_Ignored = Annotated[
    JsonValue, Field(description="OpenAI's; accepted and ignored: decoding is greedy, one choice.")
]


class ChatRequest(BaseModel):
    """OpenAI's chat completion request, the part a greedy answerer can honour: a conversation of
    any turns, streamed or not. The other fields of OpenAI's request (sampling, tools,
    bookkeeping) are accepted and ignored, as OpenAI clients send them; a field OpenAI does not
    have is refused, as OpenAI refuses it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="NAME@ALIAS or NAME@N this server serves, or the version it is on")
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=64)]
    max_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool | None = False
    # The rest of OpenAI's chat completion request (`openai.types.chat.CompletionCreateParams`).
    audio: _Ignored = None
    frequency_penalty: _Ignored = None
    function_call: _Ignored = None
    functions: _Ignored = None
    logit_bias: _Ignored = None
    logprobs: _Ignored = None
    metadata: _Ignored = None
    modalities: _Ignored = None
    moderation: _Ignored = None
    parallel_tool_calls: _Ignored = None
    prediction: _Ignored = None
    presence_penalty: _Ignored = None
    prompt_cache_key: _Ignored = None
    prompt_cache_options: _Ignored = None
    prompt_cache_retention: _Ignored = None
    reasoning_effort: _Ignored = None
    response_format: _Ignored = None
    safety_identifier: _Ignored = None
    seed: _Ignored = None
    service_tier: _Ignored = None
    stop: _Ignored = None
    store: _Ignored = None
    stream_options: _Ignored = None
    temperature: _Ignored = None
    tool_choice: _Ignored = None
    tools: _Ignored = None
    top_logprobs: _Ignored = None
    top_p: _Ignored = None
    user: _Ignored = None
    verbosity: _Ignored = None
    web_search_options: _Ignored = None


class CompletionRequest(BaseModel):
    """OpenAI's (legacy) completion request: the greedy continuation of raw text, no chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: (
        Annotated[Text, Field(min_length=1, max_length=MAX_CONTEXT_CHARS)]
        | Annotated[
            list[Annotated[Text, Field(min_length=1, max_length=MAX_CONTEXT_CHARS)]],
            Field(min_length=1, max_length=1),
        ]
    )
    max_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = 16
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool | None = False
    best_of: _Ignored = None
    echo: Literal[False] | None = None
    frequency_penalty: _Ignored = None
    logit_bias: _Ignored = None
    logprobs: _Ignored = None
    presence_penalty: _Ignored = None
    seed: _Ignored = None
    stop: _Ignored = None
    stream_options: _Ignored = None
    suffix: _Ignored = None
    temperature: _Ignored = None
    top_p: _Ignored = None
    user: _Ignored = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Health(BaseModel):
    """What the API's `/readyz` shows and no more (it needs no token): no names, hosts or paths."""

    status: Literal["ok", "degraded"]
    following: bool = Field(
        description="Whether the last look at the alias worked; when not, the version in memory is "
        "still served, labelled as what it is."
    )
    detail: dict[str, str] = Field(
        default_factory=dict, description="The type of the error that stopped the last look at the alias."
    )


def create_app(
    follower: AliasFollower,
    tokens: Mapping[str, ApiToken] | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The app for a follower that has already loaded its first version (`refresh(force=True)`).

    With `tokens`, every route but the open ones (`OPEN_PATHS`) needs one of them as a bearer
    token (any scope: reading is enough), checked from the headers before any of the body is read;
    `qfedit serve` passes them whenever it listens beyond the loopback interface. A body over
    `max_body_bytes` is refused as the API refuses it."""
    app = FastAPI(
        title="qfedit serve",
        summary=f"Generation from {follower.model_name}@{follower.alias}, following the alias.",
    )
    # Added last, so outermost: the token is checked before the body limit and before any reading.
    app.add_middleware(
        BodyLimit, limit=max_body_bytes, upload_limit=max_body_bytes, upload_paths=re.compile(r"(?!)")
    )
    if tokens is not None:
        app.add_middleware(_BearerGate, tokens=tokens)
    _install_error_handlers(app)

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

    served = f"{follower.model_name}@{follower.alias}"

    # OpenAI-compatible: existing clients (the `openai` package, LangChain, curl scripts) talk to a
    # version as to any chat model. The system messages are the context, as in QF's teacher.
    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_object(served)]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        follower.refresh()
        return _model_object(_served_name(model_id))

    def _served_name(name: str) -> str:
        if name not in (served, follower.versioned.version):
            raise _OpenAIError(
                404,
                f"model {name!r} is not served here; this server serves {served} "
                f"(now {follower.versioned.version})",
                "model_not_found",
                "model",
            )
        return name

    def _reply(
        kind: str,
        prompt: str,
        limit: int,
        field: str,
        stream: bool,
        shape: Callable[[str, str | None], dict[str, Any]],
    ) -> Response | dict[str, Any]:
        versioned = follower.versioned
        try:
            prompt_tokens = versioned.prompt_tokens(prompt, max_new_tokens=limit, field=field)
        except PromptTooLongError as err:
            raise _OpenAIError(400, str(err), "context_length_exceeded", field) from None
        identity = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time())}
        if stream:
            return StreamingResponse(
                _events(versioned, prompt, limit, identity, shape), media_type="text/event-stream"
            )
        reply = versioned.complete(prompt, max_new_tokens=limit)
        body = {
            **identity,
            "model": reply.version,
            **shape(reply.text, "stop" if reply.stopped else "length"),
        }
        body["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": reply.tokens,
            "total_tokens": prompt_tokens + reply.tokens,
        }
        return body

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(request: ChatRequest) -> Response | dict[str, Any]:
        follower.refresh()
        _served_name(request.model)
        conversation = _conversation(request.messages)
        prompt = conversation_prompt(follower.versioned.loaded.tokenizer, conversation)
        limit = request.max_completion_tokens or request.max_tokens or 24
        stream = bool(request.stream)

        def shape(text: str, finish: str | None) -> dict[str, Any]:
            if stream:  # a chunk: the text so far is in earlier chunks
                delta = (
                    {"content": text} if text else ({} if finish else {"role": "assistant", "content": ""})
                )
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return {"object": "chat.completion.chunk", "choices": [choice]}
            message = {"role": "assistant", "content": text}
            return {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            }

        return _reply("chatcmpl", prompt, limit, "messages", stream, shape)

    @app.post("/v1/completions", response_model=None)
    def completions(request: CompletionRequest) -> Response | dict[str, Any]:
        follower.refresh()
        _served_name(request.model)

        def shape(text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {"object": "text_completion", "choices": [choice]}

        return _reply("cmpl", request.text, request.max_tokens or 16, "prompt", bool(request.stream), shape)

    @app.get("/healthz")
    def healthz() -> Health:
        failure = follower.state.last_error_type
        if failure is None:
            return Health(status="ok", following=True)
        return Health(status="degraded", following=False, detail={"alias": failure})

    return app


class _BearerGate:
    """Refuses a request that does not bear one of `tokens`, from its headers alone.

    FastAPI reads and parses a body before it runs a route's dependencies, so a token checked by a
    dependency is checked only after whatever an anonymous client sent has been read; here the
    refusal goes out before the app calls `receive` at all."""

    def __init__(self, app: ASGIApp, *, tokens: Mapping[str, ApiToken]) -> None:
        self.app = app
        self.tokens = [t.token.get_secret_value().encode() for t in tokens.values()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._bears_a_token(scope):
            await self.app(scope, receive, send)
            return
        message = "a valid bearer token is required"
        if scope["path"].startswith(OPENAI_PREFIX):
            body: dict[str, Any] = {"error": _openai_body(401, message, "invalid_api_key")}
        else:
            body = {"detail": message}
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _bears_a_token(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, presented = header.partition(b" ")
        presented = presented.strip()
        # Every token compared in constant time, so timing does not reveal a near match.
        matched = [hmac.compare_digest(presented, token) for token in self.tokens]
        return scheme.lower() == b"bearer" and bool(presented) and any(matched)


def _openai_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"message": message, "type": kind, "param": param, "code": code}


class _OpenAIError(Exception):
    """An error in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), which its
    clients turn into their own exception types."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = _openai_body(status, message, code, param)


def _openai_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "messages", 0, "content")` as OpenAI names it: `messages[0].content`."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    name = ""
    for part in parts:
        if (isinstance(part, str) and not part.isidentifier()) or part in _UNION_MEMBERS:
            # Pydantic names the member of a union it tried (`str`, `list[TextPart]`, a validator
            # chain): the parameter is the field that holds the union.
            break
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or None


_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "list", "dict"})


def _install_error_handlers(app: FastAPI) -> None:
    """Refusals on the OpenAI routes in OpenAI's shape, with OpenAI's 400 for a bad request (its
    clients raise `BadRequestError`); the other routes keep FastAPI's `{"detail": ...}`. Neither
    echoes what was sent: a message could be megabytes, or text that JSON cannot encode."""

    def openai_route(request: Request) -> bool:
        return request.url.path.startswith(OPENAI_PREFIX)

    async def openai_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, _OpenAIError)
        return JSONResponse({"error": exc.body}, status_code=exc.status)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        if not openai_route(request):
            detail = [
                {"loc": e.get("loc", ()), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors
            ]
            return JSONResponse({"detail": detail}, status_code=422)
        first = errors[0] if errors else {}
        # A body that is not JSON is located by its character offset, which is no parameter.
        param = None if first.get("type") == "json_invalid" else _openai_param(first.get("loc", ()))
        message = (
            f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        )
        body = _openai_body(400, message, str(first.get("type", "invalid_request")), param)
        return JSONResponse({"error": body}, status_code=400)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if not openai_route(request):
            return await http_exception_handler(request, exc)
        code = getattr(exc, "code", None) or ("not_found" if exc.status_code == 404 else None)
        body = _openai_body(exc.status_code, str(exc.detail), code, getattr(exc, "field", None))
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)

    async def bug(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        logger.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        message = f"internal error {error_id}; the server log has the details"
        if openai_route(request):
            return JSONResponse({"error": _openai_body(500, message, "internal_error")}, status_code=500)
        return JSONResponse({"detail": message}, status_code=500)

    app.add_exception_handler(_OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, refused)
    app.add_exception_handler(Exception, bug)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "qfedit"}


def _conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them: any turns, in order, ending with the user's.
    A system (or developer) message is a system message, as for any chat model; the edited facts
    are in the weights, so none needs to be there."""
    last = messages[-1]
    if last.role != "user" or not last.text.strip():
        raise _OpenAIError(
            400, "the last message must be a non-empty user message", "invalid_messages", "messages"
        )
    if len(last.text) > MAX_QUESTION_CHARS:
        raise _OpenAIError(
            400,
            f"the question is longer than {MAX_QUESTION_CHARS} characters",
            "invalid_messages",
            "messages",
        )
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]


def _events(
    versioned: VersionedModel,
    prompt: str,
    limit: int,
    identity: dict[str, Any],
    shape: Callable[[str, str | None], dict[str, Any]],
) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: a chunk per piece of text, a last chunk with the
    finish reason, then `data: [DONE]`. The version is held for the whole stream."""
    result = Streamed()
    label = versioned.version
    for label, piece in versioned.stream(prompt, max_new_tokens=limit, result=result):
        chunk = {**identity, "model": label, **shape(piece, None)}
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    final = {**identity, "model": label, **shape("", "stop" if result.stopped else "length")}
    yield f"data: {json.dumps(final, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
