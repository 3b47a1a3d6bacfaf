"""Process settings, read from `QFEDIT_*` environment variables (or a `.env` file).

With no configuration everything lives in `./qfedit-data/`: a SQLite database and the
checkpoint store, the embedded default.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qfedit.facts import FactLimits

# What `deploy/.env.example` ships (its token, and the database password a hurried operator
# copies into the token too): a deployment that kept one would be open to anyone who read it.
PLACEHOLDER_TOKENS = frozenset({"replace-with-a-random-token", "change-me-to-a-long-random-string"})
GENERATE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
MIN_TOKEN_CHARS = 32
MIN_TOKEN_BITS = 80
"""The floor of `token_bits`: below what 32 random hex digits ever estimate, far above a
repeated pattern or a padded word."""


def token_bits(token: str) -> float:
    """A token's estimated entropy in bits: its length times the Shannon entropy of its characters.

    It sees only how varied the characters are (`abab...` is 1 bit a character, random hex about
    4); a repeated unit is refused separately."""
    counts = Counter(token)
    return -sum(n * math.log2(n / len(token)) for n in counts.values())


def token_weakness(token: str) -> str | None:
    """Why `token` is too guessable to be a bearer token, or None. Never names the token."""
    if any(placeholder in token.lower() for placeholder in PLACEHOLDER_TOKENS):
        return "the token is a placeholder of deploy/.env.example"
    if len(token) < MIN_TOKEN_CHARS:
        return f"a token needs at least {MIN_TOKEN_CHARS} characters"
    if not all("!" <= ch <= "~" for ch in token):
        return "a token is printable ASCII without spaces"
    if token in (token + token)[1:-1]:
        return "the token repeats a shorter string"
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        return f"the token is too uniform (about {bits:.0f} bits; at least {MIN_TOKEN_BITS} are needed)"
    return None


class ApiToken(BaseModel):
    """One bearer token of the HTTP API; its name (the key in `api_tokens`) is the audit actor.

    A `SecretStr`: it never shows in a repr, a log line or an error (pydantic puts the input in
    its errors unless told not to)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    token: SecretStr
    scope: Literal["read", "write", "admin"]

    @field_validator("token")
    @classmethod
    def _unguessable(cls, value: SecretStr) -> SecretStr:
        # Guessing must be hopeless; short or patterned test tokens end up in real configs.
        weakness = token_weakness(value.get_secret_value())
        if weakness is not None:
            raise ValueError(f"{weakness}; generate one with: {GENERATE_TOKEN}")
        return value


class Settings(BaseSettings):
    # No input in errors: a refused token or database URL would be printed with `--debug`.
    model_config = SettingsConfigDict(
        env_prefix="QFEDIT_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    data_dir: Path = Path("qfedit-data")
    database_url: SecretStr | None = None
    """Holds the database password: a `SecretStr`, so it never shows in a repr or a log line."""
    broker_url: str | None = None
    # The checkpoint store. Unset: the folder `data_dir/store`. A path or `file://` URL: that
    # folder (a shared filesystem for several hosts). `s3://bucket/prefix`: S3-compatible object
    # storage through fsspec; credentials come from the usual AWS variables or `store_options`.
    store_url: str | None = None
    store_endpoint_url: str | None = None
    """HTTP endpoint of an S3-compatible server (MinIO, Ceph, R2); unset means AWS itself."""
    store_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    """Further fsspec storage options, JSON (e.g. `{"client_kwargs": {"region_name": "eu-west-1"}}`)."""
    corpus_root: Path | None = None
    """The folder whose files model settings may name (corpora, evaluation sets); unset: the data
    folder. Files shipped with qfedit (the demo's) are always readable."""
    queue_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,40}$")
    """Put before the queue names (`default`, `gpu`), so deployments sharing one Redis keep their
    tasks apart: `blue-` makes `blue-default` and `blue-gpu`. `qfedit worker --queues gpu,default`
    names them without it."""
    worker_remote_control: bool = False
    """Celery's remote control (`inspect`, `control`) on workers: off, so a client that reaches the
    broker cannot query or command them."""
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    """CPU threads torch uses in a worker (and the embedded worker child). Unset: torch's default,
    every core, which is right for one worker a host; with N workers on a host, or a host shared
    with other work, give each cores / N: several processes each spinning every core slow each
    other down far more than their share (see the README, "Scaling workers")."""
    cpu_tokens: bool = True
    """On a CPU device, tasks hold the cores they compute with as lock files (`qfedit.cpu`), so the
    workers of a host never run more threads than it has cores, and a solve borrows the cores of
    idle workers. Off: each task runs on `torch_threads` whatever the others do."""
    cpu_tokens_dir: Path | None = None
    """The host-local folder of those lock files; unset: `cpu-tokens` in the data folder, so that
    only this deployment's workers share it. Made 0700, and refused if another user owns it or
    others may write to it. Workers in separate containers on one host share cores only through a
    shared folder here; a data folder shared by several hosts needs a host-local one here."""
    # The queue. Bounded below (and finite): `stall_after_s=-1` made beat resend every batch in a
    # tight loop, thousands of tasks in seconds.
    visibility_timeout: int = Field(default=3600, ge=1)
    """Seconds before a Redis message taken by a worker that died is delivered again."""
    nightly_at: str = "02:00"
    """UTC time of the nightly edit of pending facts, HH:MM."""
    stall_after_s: float = Field(default=300.0, ge=1.0, allow_inf_nan=False)
    """A batch in flight with no change for this long is sent again (a lost message)."""
    task_attempts: int = Field(default=3, ge=1)
    """Tries of a failing task before its batch is marked failed."""
    max_task_deliveries: int = Field(default=3, ge=1)
    """Times one task may start and never end (its worker died in it: out of memory, `kill -9`)
    before its batch is failed, naming the task, so the rest of the queue runs."""
    line_wait_s: float = Field(default=5.0, gt=0.0, le=3600.0, allow_inf_nan=False)
    """How often a batch waiting for its model's line checks again."""
    heartbeat_s: float = Field(default=10.0, ge=0.5, le=600.0, allow_inf_nan=False)
    """How often a worker writes its heartbeat row; one not seen for three of these is gone and
    its tasks are handed on. Every process of a deployment must read the same value."""

    def queue(self, name: str) -> str:
        """The broker's name of the queue `name` (`default`, `gpu`) in this deployment."""
        return f"{self.queue_prefix}{name}"

    @field_validator("nightly_at")
    @classmethod
    def _hh_mm(cls, value: str) -> str:
        hour, _, minute = value.partition(":")
        if not (hour.isdigit() and minute.isdigit() and 0 <= int(hour) < 24 and 0 <= int(minute) < 60):
            raise ValueError(f"nightly_at must be HH:MM (UTC), not {value!r}")
        return value

    # HTTP API: `QFEDIT_API_TOKENS='{"alice": {"token": "...", "scope": "write"}}'`.
    api_tokens: dict[str, ApiToken] = Field(default_factory=dict)
    api_max_body_bytes: int = Field(default=1 << 20, ge=1024)  # JSON requests
    api_max_upload_bytes: int = Field(default=1 << 30, ge=1024)  # fact imports
    api_max_batch_facts: int = Field(default=100_000, ge=1)
    api_max_prompt_chars: int = Field(default=4000, ge=1)
    # How large a fact may be: checked on import (a larger one is a reject naming the field and the
    # limit) and again by a worker before it captures (a larger one is refused, named on its batch).
    fact_max_chars: int = Field(default=4000, ge=1)
    """Characters of a fact's question, answer, subject, each paraphrase and each neighbour."""
    fact_max_context_chars: int = Field(default=16000, ge=1)
    fact_max_items: int = Field(default=100, ge=0)
    """Paraphrases, and neighbours, of one fact."""

    @field_validator("api_tokens")
    @classmethod
    def _distinct_tokens(cls, tokens: dict[str, ApiToken]) -> dict[str, ApiToken]:
        # A token shared by two names would make the audit actor ambiguous.
        seen: dict[str, str] = {}
        for name, entry in tokens.items():
            if not name.strip() or len(name) > 200:
                raise ValueError(f"API token name {name!r} must be 1-200 characters")
            token = entry.token.get_secret_value()
            if token in seen:
                raise ValueError(f"API tokens {seen[token]!r} and {name!r} are the same token")
            seen[token] = name
        return tokens

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in {"float32", "float16", "bfloat16", "float64"}:
            raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, not {value!r}")
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url is not None and self.database_url.get_secret_value():
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'qfedit.db').resolve()}"

    @property
    def fact_limits(self) -> FactLimits:
        return FactLimits(self.fact_max_chars, self.fact_max_context_chars, self.fact_max_items)

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def locations(self) -> dict[str, str]:
        """Where the database, the checkpoint store and the broker are, without credentials:
        what a command tells its user before it writes anything."""
        from urllib.parse import urlsplit

        def shown(url: str) -> str:
            # scheme://host:port/path, with any user and password left out
            parts = urlsplit(url)
            return (
                f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
            )

        database = self.resolved_database_url
        return {
            "database": database if database.startswith("sqlite") else shown(database),
            "checkpoint store": shown(self.store_url)
            if self.store_url and "://" in self.store_url
            else str(Path(self.store_url or self.store_dir).resolve()),
            "broker": shown(self.broker_url)
            if self.broker_url
            else f"embedded, {(self.data_dir / 'broker').resolve()}",
        }


def get_settings() -> Settings:
    return Settings()
