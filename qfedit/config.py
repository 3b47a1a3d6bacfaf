"""Process settings, read from `QFEDIT_*` environment variables (or a `.env` file).

With no configuration everything lives in `./qfedit-data/`: a SQLite database and the
checkpoint store, the embedded default.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QFEDIT_", env_file=".env", extra="ignore")

    data_dir: Path = Path("qfedit-data")
    database_url: str | None = None
    broker_url: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in {"float32", "float16", "bfloat16", "float64"}:
            raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, not {value!r}")
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'qfedit.db').resolve()}"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"


def get_settings() -> Settings:
    return Settings()
