"""`qfedit serve`'s app follows an alias move without a restart; `qfedit export` from the database.

On SQLite and PostgreSQL: versions are recorded as a worker records them (checkpoint stored
first), and the alias is moved in another session, as `qfedit alias set` would.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from db.helpers import add_facts
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from api.serve import ChatRequest, create_app
from cli import get_app
from qfedit import registry as records
from qfedit.capture import conversation_prompt
from qfedit.config import ApiToken
from qfedit.db import session_factory
from qfedit.delta import Delta, applied
from qfedit.generate import answer, generate_prompts
from qfedit.modeling import load_model, weights_fingerprint
from qfedit.serving import AliasFollower, FollowerState, VersionedModel, follow_alias
from qfedit.store import LocalStore

QUESTION = "who founded Oxinnovate?"


class Registry:
    """The tiny Qwen2 registered as `tiny`, versions 1 (delta a) and 2 (delta b), alias at 1."""

    def __init__(self, engine: Engine, store: LocalStore, model_dir: Path, deltas: dict[str, Delta]) -> None:
        self.sessions: sessionmaker[Session] = session_factory(engine)
        self.store = store
        with self.sessions() as session:
            model = records.add_model(
                session,
                name="tiny",
                source=str(model_dir),
                fingerprint=weights_fingerprint(model_dir),
                actor="t",
            )
            facts = add_facts(session, model, 3)
            for number, (key, fact_ids) in enumerate((("a", facts[:2]), ("b", facts)), start=1):
                records.record_version(
                    session,
                    model=model,
                    fact_ids=fact_ids,
                    created_by="worker",
                    reason=f"version {number}",
                    checkpoint=store.put_bytes(deltas[key].to_bytes()),
                    layer=1,
                    rule="seed",
                )
            records.set_alias(
                session,
                name="production",
                version=records.get_version(session, "tiny@1"),
                reason="go",
                actor="t",
            )
            session.commit()

    def move(self, ref: str) -> None:
        with self.sessions() as session:
            version = records.get_version(session, ref)
            records.set_alias(session, name="production", version=version, reason="test", actor="t")
            session.commit()

    def checkpoint(self, ref: str) -> Path:
        with self.sessions() as session:
            version = records.get_version(session, ref)
            assert version.checkpoint_path is not None
            return self.store.resolve(version.checkpoint_path)


@pytest.fixture
def registry(
    engine: Engine, tmp_path: Path, tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> Registry:
    (tmp_path / "store").mkdir()
    return Registry(engine, LocalStore(tmp_path / "store"), tiny_model_dirs["qwen2"], deltas["qwen2"])


@pytest.fixture
def migrated_registry(
    empty_engine: Engine,
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    deltas: dict[str, dict[str, Delta]],
) -> Registry:
    """As `registry`, on a database made by the migrations, as the CLI requires."""
    from qfedit.db import migrate

    migrate.upgrade(empty_engine)
    (tmp_path / "store").mkdir()
    return Registry(empty_engine, LocalStore(tmp_path / "store"), tiny_model_dirs["qwen2"], deltas["qwen2"])


def _follower(registry: Registry, model_dir: Path, **options: Any) -> AliasFollower:
    return follow_alias(
        load_model(model_dir),
        sessions=registry.sessions,
        store=registry.store,
        model_name="tiny",
        alias="production",
        **options,
    )


def _generate(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/generate", json={"question": QUESTION, "max_new_tokens": 4, **body})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_serve_follows_an_alias_move_without_restart(
    registry: Registry, tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    model_dir = tiny_model_dirs["qwen2"]
    reference = load_model(model_dir)
    expected = {"tiny@0": answer(reference, QUESTION, max_new_tokens=4)}
    for label, key in (("tiny@1", "a"), ("tiny@2", "b")):
        with applied(reference, deltas["qwen2"][key]):
            expected[label] = answer(reference, QUESTION, max_new_tokens=4)

    client = TestClient(create_app(_follower(registry, model_dir, poll_s=0)))
    assert _generate(client)["version"] == "tiny@1"
    for ref in ("tiny@1", "tiny@2", "tiny@0", "tiny@2"):
        registry.move(ref)
        reply = _generate(client)
        assert reply == {"answer": expected[ref], "version": ref}
    assert client.get("/healthz").json() == {"status": "ok", "following": True, "detail": {}}


def test_serve_looks_at_the_alias_at_most_every_poll_interval(
    registry: Registry, tiny_model_dirs: dict[str, Path]
) -> None:
    now = [0.0]
    follower = _follower(registry, tiny_model_dirs["qwen2"], poll_s=30, clock=lambda: now[0])
    client = TestClient(create_app(follower))
    assert _generate(client)["version"] == "tiny@1"
    registry.move("tiny@2")
    now[0] = 29.0
    assert _generate(client)["version"] == "tiny@1"
    now[0] = 31.0
    assert _generate(client)["version"] == "tiny@2"


def test_a_corrupt_checkpoint_keeps_the_current_version_and_says_why(
    registry: Registry, tiny_model_dirs: dict[str, Path]
) -> None:
    follower = _follower(registry, tiny_model_dirs["qwen2"], poll_s=0)
    client = TestClient(create_app(follower))
    path = registry.checkpoint("tiny@2")
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    registry.move("tiny@2")
    assert _generate(client)["version"] == "tiny@1"
    assert follower.state.last_error is not None and "sha256" in follower.state.last_error
    # The probe, open to anyone, says that following fails and the error's type, not the path.
    health = client.get("/healthz")
    assert health.json() == {
        "status": "degraded",
        "following": False,
        "detail": {"alias": "ChecksumMismatch"},
    }
    assert str(path.parent) not in health.text


@pytest.mark.backends("sqlite")
def test_serve_refuses_other_weights_and_a_missing_alias(
    registry: Registry, tiny_model_dirs: dict[str, Path]
) -> None:
    with pytest.raises(ValueError, match="registered with base weights"):
        _follower(registry, tiny_model_dirs["llama"])
    with pytest.raises(
        records.NotFoundError, match="'tiny@staging' is neither a version number nor an alias"
    ):
        follow_alias(
            load_model(tiny_model_dirs["qwen2"]),
            sessions=registry.sessions,
            store=registry.store,
            model_name="tiny",
            alias="staging",
        )


@pytest.mark.backends("sqlite")
def test_bad_generate_requests_get_a_422_naming_the_field(
    registry: Registry, tiny_model_dirs: dict[str, Path]
) -> None:
    client = TestClient(create_app(_follower(registry, tiny_model_dirs["qwen2"])))
    cases = [
        ({}, "question"),
        ({"question": ""}, "question"),
        ({"question": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"question": "x", "max_new_tokens": "many"}, "max_new_tokens"),
        ({"question": "x", "temperature": 1}, "temperature"),
        ({"question": "Qi " * 200}, "question"),  # longer than the tiny model's 128 positions
        ({"question": "x", "context": "Qi " * 200}, "context"),
    ]
    for body, field in cases:
        response = client.post("/generate", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in [str(part) for error in response.json()["detail"] for part in error["loc"]], body
    assert (
        client.post(
            "/generate", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )


@pytest.mark.backends("sqlite")
def test_serve_with_tokens_generates_only_for_a_bearer_of_one(
    registry: Registry, tiny_model_dirs: dict[str, Path]
) -> None:
    token = "serve-reader-token-0123456789abcdefghij"
    tokens = {"reader": ApiToken(token=token, scope="read")}
    client = TestClient(create_app(_follower(registry, tiny_model_dirs["qwen2"]), tokens))
    body = {"question": QUESTION, "max_new_tokens": 2}
    assert client.post("/generate", json=body).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * len(token)}
    assert client.post("/generate", json=body, headers=wrong).status_code == 401
    right = client.post("/generate", json=body, headers={"Authorization": f"Bearer {token}"})
    assert right.status_code == 200, right.text
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_serve_beyond_loopback_refuses_to_start_without_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QFEDIT_API_TOKENS", raising=False)
    result = CliRunner().invoke(get_app(), ["serve", "--model", "tiny", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "needs bearer tokens" in result.output


def test_export_command_writes_full_and_lora(
    migrated_registry: Registry,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = migrated_registry
    monkeypatch.setenv("QFEDIT_DATA_DIR", str(registry.store.root.parent))
    monkeypatch.setenv("QFEDIT_DATABASE_URL", database_url)
    # The CLI finds the store under the data folder; the registry's store is that folder's `store`.
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> str:
        result = runner.invoke(get_app(), list(args), catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        return " ".join(result.output.split())  # rich wraps lines to the terminal width

    out = run("export", "tiny@production", str(tmp_path / "full"))
    assert "tiny@1" in out and "1 tensor(s) merged" in out
    assert json.loads((tmp_path / "full" / "qfedit_export.json").read_text())["version"] == "tiny@1"
    out = run("export", "tiny@2", str(tmp_path / "lora"), "--format", "lora", "--rank", "2")
    assert "truncated" in out and "model.layers.2.mlp.down_proj" in out
    assert "the base model" in run("export", "tiny@0", str(tmp_path / "l0"), "--format", "lora", ok=False)
    assert "not empty" in run("export", "tiny@1", str(tmp_path / "full"), ok=False)


def test_ask_and_eval_take_a_version_instead_of_a_directory(
    migrated_registry: Registry,
    database_url: str,
    tiny_model_dirs: dict[str, Path],
    deltas: dict[str, dict[str, Delta]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qfedit.facts import Fact, write_jsonl

    monkeypatch.setenv("QFEDIT_DATA_DIR", str(migrated_registry.store.root.parent))
    monkeypatch.setenv("QFEDIT_DATABASE_URL", database_url)
    reference = load_model(tiny_model_dirs["qwen2"])
    with applied(reference, deltas["qwen2"]["a"]):
        expected = answer(reference, QUESTION, max_new_tokens=6)
    runner = CliRunner()
    asked = runner.invoke(get_app(), ["ask", "tiny@production", QUESTION, "--max-new-tokens", "6"])
    assert asked.exit_code == 0, asked.output
    assert asked.stdout.strip() == expected  # production is tiny@1: delta a, from the store
    pinned = runner.invoke(get_app(), ["ask", "tiny@1", QUESTION, "--max-new-tokens", "6"])
    assert pinned.stdout.strip() == expected
    refused = runner.invoke(get_app(), ["ask", "tiny@1", QUESTION, "--delta", __file__])
    assert refused.exit_code == 2 and "a version brings its own" in refused.output
    assert (
        "neither a model directory nor a version" in runner.invoke(get_app(), ["ask", "nowhere", "q"]).output
    )
    write_jsonl([Fact(question=QUESTION, answer="Ann", context="Ann founded it.")], tmp_path / "f.jsonl")
    measured = runner.invoke(get_app(), ["eval", "tiny@production", str(tmp_path / "f.jsonl"), "--json"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["counts"]["facts"] == 1


@pytest.mark.backends("sqlite")
def test_openai_clients_talk_to_a_version_as_to_a_chat_model(
    registry: Registry, tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    import openai

    model_dir = tiny_model_dirs["qwen2"]
    reference = load_model(model_dir)
    context = "The founder of Oxinnovate is Ann Lee."
    with applied(reference, deltas["qwen2"]["a"]):
        expected = answer(reference, QUESTION, context, max_new_tokens=5)
    http = TestClient(create_app(_follower(registry, model_dir, poll_s=0)))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny@production"]
    # The system message is the context, the user message the question; decoding is greedy.
    reply = client.chat.completions.create(
        model="tiny@production",
        messages=[{"role": "system", "content": context}, {"role": "user", "content": QUESTION}],
        max_tokens=5,
        temperature=0.7,
    )
    assert reply.choices[0].message.content == expected and reply.model == "tiny@1"
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 5
    # The version it is on is a name for it too; after the alias moves, the reply names the new one.
    registry.move("tiny@2")
    moved = client.chat.completions.create(
        model="tiny@production", messages=[{"role": "user", "content": QUESTION}], max_tokens=3
    )
    assert moved.model == "tiny@2"
    assert (
        client.chat.completions.create(
            model="tiny@2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ).model
        == "tiny@2"
    )
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="tiny@1", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="last message must be a non-empty user message"):
        client.chat.completions.create(
            model="tiny@production",
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        )


@pytest.mark.backends("sqlite")
def test_chat_uis_stream_converse_in_turns_send_parts_and_complete_raw_text(
    registry: Registry, tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    """What chat UIs and scripts send, through OpenAI's own client: a conversation of several turns
    (answered as the chat template renders it, a system message being just that), content as a
    list of text parts, `stream: true` (server-sent events whose pieces make the same answer), the
    legacy completions route on raw text, and the model route."""
    import openai

    model_dir = tiny_model_dirs["qwen2"]
    reference = load_model(model_dir)
    turns = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": QUESTION},
    ]
    raw = "Oxinnovate was founded by"
    with applied(reference, deltas["qwen2"]["a"]):
        (expected,) = generate_prompts(
            reference, [conversation_prompt(reference.tokenizer, turns)], max_new_tokens=6
        )
        (continued,) = generate_prompts(reference, [raw], max_new_tokens=5)
    http = TestClient(create_app(_follower(registry, model_dir, poll_s=0)))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)

    reply = client.chat.completions.create(model="tiny@production", messages=turns, max_tokens=6)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == expected.text and reply.model == "tiny@1"
    parts = [
        *turns[:-1],
        {
            "role": "user",
            "content": [{"type": "text", "text": "who founded "}, {"type": "text", "text": "Oxinnovate?"}],
        },
    ]
    in_parts = client.chat.completions.create(model="tiny@production", messages=parts, max_tokens=6)  # type: ignore[arg-type]
    assert in_parts.choices[0].message.content == expected.text

    chunks = list(
        client.chat.completions.create(model="tiny@production", messages=turns, max_tokens=6, stream=True)
    )  # type: ignore[arg-type]
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == expected.text
    assert {c.model for c in chunks} == {"tiny@1"} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].choices[0].finish_reason == ("stop" if expected.stopped else "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    completion = client.completions.create(model="tiny@production", prompt=raw, max_tokens=5)
    assert completion.choices[0].text == continued.text and completion.model == "tiny@1"
    assert completion.usage is not None and completion.usage.completion_tokens == continued.tokens
    pieces = list(client.completions.create(model="tiny@production", prompt=raw, max_tokens=5, stream=True))
    assert "".join(p.choices[0].text for p in pieces).strip() == continued.text

    assert client.models.retrieve("tiny@production").id == "tiny@production"
    assert client.models.retrieve("tiny@1").id == "tiny@1"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("other@production")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny@production",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ],  # type: ignore[list-item]
        )
    assert refused.value.param is not None and refused.value.param.startswith("messages[0].content")


def test_a_stream_closed_early_ends_its_generation_and_lets_the_version_go(
    tiny_model_dirs: dict[str, Path],
) -> None:
    versioned = VersionedModel(load_model(tiny_model_dirs["qwen2"]), base_label="tiny@0")
    prompt = conversation_prompt(versioned.loaded.tokenizer, [{"role": "user", "content": QUESTION}])
    stream = versioned.stream(prompt, max_new_tokens=400)
    assert next(stream) == ("tiny@0", "")
    next(stream)  # the generation is under way and holds the version
    switched = threading.Thread(target=versioned.switch_to, args=(None, "tiny@base"))
    switched.start()
    switched.join(timeout=0.5)
    assert switched.is_alive(), "a switch went ahead while a stream held the version"
    stream.close()  # the client went away
    switched.join(timeout=30)
    assert not switched.is_alive() and versioned.version == "tiny@base"


@pytest.mark.backends("sqlite")
def test_a_pinned_version_is_served_whatever_the_alias_does(
    registry: Registry, tiny_model_dirs: dict[str, Path]
) -> None:
    follower = follow_alias(
        load_model(tiny_model_dirs["qwen2"]),
        sessions=registry.sessions,
        store=registry.store,
        model_name="tiny",
        alias="2",
        poll_s=0,
    )
    client = TestClient(create_app(follower))
    assert _generate(client)["version"] == "tiny@2"
    registry.move("tiny@1")
    assert _generate(client)["version"] == "tiny@2"


# -- hardening: what reaches serve without a token, and how refusals look --------------------------

SERVE_TOKEN = "serve-reader-token-0123456789abcdefghij"
CHAT = "/v1/chat/completions"


def _no_model(**options: Any) -> Any:
    """An app whose routes must never run: every request here is refused before one would."""
    follower = SimpleNamespace(model_name="tiny", alias="production", state=FollowerState())
    return create_app(follower, **options)  # type: ignore[arg-type]


def _call_asgi(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, int]:
    """POST `path` straight to the ASGI app; returns the status, the body and how often the app
    asked for the request body (`receive`)."""
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        # A stand-in for the 200 MB: 1 MiB, so an app that reads the body fails here, not OOMs.
        return {"type": "http.request", "body": b"x" * 65536, "more_body": received < 16}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, received


@pytest.mark.parametrize("path", ["/generate", CHAT])
def test_a_200_mb_body_without_a_token_is_refused_before_any_of_it_is_read(path: str) -> None:
    # The attack: 200 MB posted without a token grew serve's memory by 0.7 GB, then got its 401.
    app = _no_model(tokens={"reader": ApiToken(token=SERVE_TOKEN, scope="read")})  # type: ignore[arg-type]
    huge = [(b"content-length", b"200000000")]
    for credentials in ([], [(b"authorization", b"Bearer " + b"x" * len(SERVE_TOKEN))]):
        status, body, received = _call_asgi(app, path, huge + credentials)
        assert (status, received) == (401, 0), body
    if path == CHAT:
        assert json.loads(body)["error"]["code"] == "invalid_api_key"  # OpenAI's shape
    # With the token, serve's body limit is the API's: refused by its declared size, still unread.
    authorized = [(b"authorization", f"Bearer {SERVE_TOKEN}".encode())]
    status, body, received = _call_asgi(app, path, huge + authorized)
    assert (status, received) == (413, 0), body


@pytest.mark.parametrize("path", ["/generate", CHAT])
def test_a_chunked_body_over_the_limit_is_cut_off(path: str) -> None:
    client = TestClient(_no_model(max_body_bytes=4096))
    chunks = (b'{"question": "' + b"x" * 4096 for _ in range(1))
    response = client.post(path, content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert "4096" in (response.json()["error"]["message"] if path == CHAT else response.json()["detail"])


def test_chat_requests_refuse_fields_openai_does_not_have() -> None:
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    # Every field of OpenAI's request (what its clients send) is accepted; sampling ones are ignored.
    assert set(CompletionCreateParamsBase.__annotations__) <= set(ChatRequest.model_fields)
    message = {"role": "user", "content": "hi"}
    ChatRequest.model_validate(
        {"model": "m", "messages": [message], "temperature": 0.7, "top_p": 0.9, "seed": 1, "user": "u"}
    )
    client = TestClient(_no_model())
    response = client.post(CHAT, json={"model": "tiny@production", "messages": [message], "tempreature": 0})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "tempreature: Extra inputs are not permitted",
            "type": "invalid_request_error",
            "param": "tempreature",
            "code": "extra_forbidden",
        }
    }


def test_openai_routes_refuse_bad_requests_in_openai_shape() -> None:
    import openai

    http = TestClient(_no_model())
    # The attack: a lone surrogate (JSON's `\ud800`) in a message was a plain 500.
    lone = b'{"model": "tiny@production", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    response = http.post(CHAT, content=lone, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages[0].content")
    assert "surrogate" in error["message"]
    broken = http.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and set(broken.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/v1/nowhere").json()["error"]["code"] == "not_found"
    # `/generate` keeps FastAPI's shape, refuses the same text, and echoes none of the input.
    generated = http.post(
        "/generate", content=b'{"question": "\\ud800"}', headers={"content-type": "application/json"}
    )
    assert generated.status_code == 422 and generated.json()["detail"][0]["loc"] == ["body", "question"]
    assert "input" not in generated.json()["detail"][0]
    # OpenAI's own client reads the refusal as its BadRequestError, with the parameter named.
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny@production", messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert refused.value.param == "n" and refused.value.type == "invalid_request_error"


@pytest.mark.backends("sqlite")
def test_health_shows_no_database_address_or_store_path(
    registry: Registry, tiny_model_dirs: dict[str, Path]
) -> None:
    from qfedit.db import make_engine

    follower = _follower(registry, tiny_model_dirs["qwen2"], poll_s=0)
    tokens = {"reader": ApiToken(token=SERVE_TOKEN, scope="read")}
    client = TestClient(create_app(follower, tokens))
    assert client.get("/healthz").json() == {"status": "ok", "following": True, "detail": {}}
    # The attack: with the database gone, /healthz (no token) showed its host, port and name.
    gone = make_engine(
        "postgresql+psycopg://qfedit@127.0.0.1:9/secret_db_name", connect_args={"connect_timeout": 2}
    )
    follower.sessions = session_factory(gone)
    assert follower.refresh() is False and follower.state.last_error is not None
    assert "127.0.0.1" in follower.state.last_error  # what the log gets
    health = client.get("/healthz")
    assert health.json() == {
        "status": "degraded",
        "following": False,
        "detail": {"alias": "OperationalError"},
    }
    for leak in ("127.0.0.1", ":9", "secret_db_name", str(registry.store.root)):
        assert leak not in health.text
    gone.dispose()
