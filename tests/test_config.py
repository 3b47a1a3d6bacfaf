"""Process settings: tokens that cannot be guessed, no secret in a repr, and queue timings that
are finite and positive."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from qfedit.config import ApiToken, Settings


@pytest.mark.parametrize(
    "token",
    [
        "replace-with-a-random-token",
        "short-token-0123456789",
        "a" * 40,
        "-" * 64,
        # The attacks: each was accepted as a bearer token.
        "change-me-to-a-long-random-string",  # the compose file's own placeholder password
        "ab" * 20,
        " " * 40 + "x",
        # Their neighbours: a repeated unit, low diversity, whitespace, a decorated placeholder.
        "0123456789" * 4,
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbbbbbbbbbbbbcd",
        "tok-0123456789abcdefghijklmnopq rstuv",
        "Replace-With-A-Random-Token-0123456789",
    ],
)
def test_guessable_tokens_are_refused_with_the_way_to_make_one(token: str) -> None:
    with pytest.raises(ValidationError, match=r"secrets\.token_urlsafe") as refused:
        ApiToken(token=token, scope="read")  # type: ignore[arg-type]
    assert token not in str(refused.value)


def test_generated_tokens_clear_the_entropy_floor() -> None:
    import secrets

    for _ in range(2000):
        for token in (secrets.token_hex(16), secrets.token_urlsafe(24), secrets.token_hex(32)):
            ApiToken(token=token, scope="read")  # type: ignore[arg-type]


def test_the_placeholders_deploy_ships_are_refused_as_tokens() -> None:
    import json

    example = Path(__file__).resolve().parents[1] / "deploy" / ".env.example"
    values = dict(
        line.partition("=")[::2]
        for line in example.read_text().splitlines()
        if line and not line.startswith("#")
    )
    placeholders = [values["POSTGRES_PASSWORD"]]
    placeholders += [t["token"] for t in json.loads(values["QFEDIT_API_TOKENS"]).values()]
    for placeholder in placeholders:
        with pytest.raises(ValidationError, match="placeholder"):
            ApiToken(token=placeholder, scope="admin")  # type: ignore[arg-type]


def test_a_refused_token_is_not_echoed_even_with_debug(tmp_path: Path) -> None:
    # The attack: `qfedit --debug ...` printed pydantic's error, which carries the rejected input.
    import json

    token = "zq-not-to-be-echoed"
    variables = {"QFEDIT_API_TOKENS": json.dumps({"ci": {"token": token, "scope": "write"}})}
    with pytest.raises(ValidationError) as refused:
        Settings(api_tokens={"ci": {"token": token, "scope": "write"}})  # type: ignore[dict-item]
    assert token not in str(refused.value) and "zq-not" not in repr(refused.value)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFEDIT_")}
    env.update(variables, QFEDIT_DATA_DIR=str(tmp_path / "data"))
    for debug in ([], ["--debug"]):
        done = subprocess.run(
            [sys.executable, "-m", "cli", *debug, "versions"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0
        assert "QFEDIT_API_TOKENS" in done.stderr or "api_tokens" in done.stderr
        assert "zq-not" not in done.stdout + done.stderr


def test_secrets_never_show_in_a_repr() -> None:
    token = "tok-0123456789abcdefghijklmnopqrstuv"
    settings = Settings(
        database_url="postgresql+psycopg://qfedit:pg-password-123@db/qfedit",  # type: ignore[arg-type]
        api_tokens={"admin": {"token": token, "scope": "admin"}},  # type: ignore[dict-item]
        store_options={"key": "AKIA-store-key", "secret": "store-secret"},
    )
    shown = repr(settings) + str(settings) + repr(settings.api_tokens)
    for secret in (token, "pg-password-123", "store-secret"):
        assert secret not in shown
    assert settings.resolved_database_url.endswith("pg-password-123@db/qfedit")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # The attack: beat resent every batch in a tight loop, about 3,000 tasks in 12 s.
        ("QFEDIT_STALL_AFTER_S", "-1"),
        ("QFEDIT_STALL_AFTER_S", "nan"),
        ("QFEDIT_STALL_AFTER_S", "inf"),
        ("QFEDIT_STALL_AFTER_S", "0"),
        ("QFEDIT_LINE_WAIT_S", "nan"),
        ("QFEDIT_LINE_WAIT_S", "-5"),
        ("QFEDIT_LINE_WAIT_S", "inf"),
        ("QFEDIT_HEARTBEAT_S", "0"),
        ("QFEDIT_HEARTBEAT_S", "nan"),
        ("QFEDIT_TASK_ATTEMPTS", "-1"),
        ("QFEDIT_TASK_ATTEMPTS", "0"),
        ("QFEDIT_MAX_TASK_DELIVERIES", "0"),
        ("QFEDIT_VISIBILITY_TIMEOUT", "-3600"),
        ("QFEDIT_VISIBILITY_TIMEOUT", "inf"),
    ],
)
def test_negative_nan_or_infinite_queue_settings_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from cli import settings_error

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert settings_error(refused.value).startswith(f"setting {variable}:")


def test_a_command_refuses_to_start_on_a_negative_stall_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFEDIT_")}
    env.update(QFEDIT_STALL_AFTER_S="-1", QFEDIT_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run(
        [sys.executable, "-m", "cli", "beat"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "setting QFEDIT_STALL_AFTER_S:" in done.stderr and "greater than or equal to 1" in done.stderr
    assert not (tmp_path / "data" / "beat-schedule").exists()  # refused before beat ran


def test_locations_name_each_part_where_it_is_and_no_credential(tmp_path: Path) -> None:
    embedded = Settings(data_dir=tmp_path).locations()
    assert embedded == {
        "database": f"sqlite:///{(tmp_path / 'qfedit.db').resolve()}",
        "checkpoint store": str((tmp_path / "store").resolve()),
        "broker": f"embedded, {(tmp_path / 'broker').resolve()}",
    }
    served = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://qfedit:s3cret-pw@db.internal:5432/qfedit",  # type: ignore[arg-type]
        broker_url="redis://:r3dis-pw@cache.internal:6379/0",
        store_url="s3://bucket/checkpoints",
    ).locations()
    assert served == {
        "database": "postgresql+psycopg://db.internal:5432/qfedit",
        "checkpoint store": "s3://bucket/checkpoints",
        "broker": "redis://cache.internal:6379/0",
    }


def test_a_queue_prefix_keeps_two_deployments_on_one_redis_apart() -> None:
    # Two deployments on one Redis: with fixed names (`default`, `gpu`) one's workers took the
    # other's tasks. Real Redis, a database of its own.
    import redis

    from worker.app import create_app

    url = "redis://127.0.0.1:6379/14"
    server = redis.Redis.from_url(url)
    server.flushdb()
    try:
        blue, green = (create_app(Settings(broker_url=url, queue_prefix=p)) for p in ("blue-", "green-"))
        assert blue.conf.task_default_queue == "blue-default"
        blue.send_task("qfedit.capture_shard", args=[1, 2])
        green.send_task("qfedit.start_batch", args=[3])
        assert (server.llen("blue-gpu"), server.llen("green-default")) == (1, 1)
        assert server.llen("gpu") == server.llen("default") == server.llen("green-gpu") == 0
    finally:
        server.flushdb()
    with pytest.raises(ValidationError, match="queue_prefix"):
        Settings(queue_prefix="a b")
