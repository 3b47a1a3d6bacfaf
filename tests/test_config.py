"""Secrets in the process settings: tokens that cannot be guessed, and no secret in a repr."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qfedit.config import ApiToken, Settings


@pytest.mark.parametrize(
    "token",
    ["replace-with-a-random-token", "short-token-0123456789", "a" * 40, "-" * 64],
)
def test_guessable_tokens_are_refused_with_the_way_to_make_one(token: str) -> None:
    with pytest.raises(ValidationError, match=r"secrets\.token_urlsafe"):
        ApiToken(token=token, scope="read")  # type: ignore[arg-type]


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
