"""Process settings, read from `QFEDIT_*` environment variables (or a `.env` file).

With no configuration everything lives in `./qfedit-data/`: a SQLite database and the
checkpoint store, the embedded default.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What `deploy/.env.example` ships: a deployment that kept it would be open to anyone who read it.
PLACEHOLDER_TOKENS = frozenset({"replace-with-a-random-token"})
GENERATE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


class ApiToken(BaseModel):
    """One bearer token of the HTTP API; its name (the key in `api_tokens`) is the audit actor.

    A `SecretStr`: it never shows in a repr, a log line or an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr
    scope: Literal["read", "write", "admin"]

    @field_validator("token")
    @classmethod
    def _unguessable(cls, value: SecretStr) -> SecretStr:
        # Long and varied enough that guessing is hopeless; short test tokens end up in real configs.
        token = value.get_secret_value()
        if token in PLACEHOLDER_TOKENS:
            raise ValueError(f"the token is the example placeholder; generate one with: {GENERATE_TOKEN}")
        if len(token) < 32 or len(set(token)) == 1:
            raise ValueError(
                f"a token needs at least 32 characters, not all the same; generate one with: {GENERATE_TOKEN}"
            )
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QFEDIT_", env_file=".env", extra="ignore")

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
    """The host-local folder of those lock files; unset: `qfedit-cpu-UID` in the temporary folder.
    Workers in separate containers on one host share cores only through a shared folder here."""
    # The queue.
    visibility_timeout: int = 3600
    """Seconds before a Redis message taken by a worker that died is delivered again."""
    nightly_at: str = "02:00"
    """UTC time of the nightly edit of pending facts, HH:MM."""
    stall_after_s: float = 300.0
    """A batch in flight with no change for this long is sent again (a lost message)."""
    task_attempts: int = 3
    """Tries of a failing task before its batch is marked failed."""
    line_wait_s: float = 5.0
    """How often a batch waiting for its model's line checks again."""

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
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"


def get_settings() -> Settings:
    return Settings()
