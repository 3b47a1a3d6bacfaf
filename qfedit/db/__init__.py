"""The database: typed ORM tables, engines and sessions, write-once guards, migrations."""

from qfedit.db import guards as guards
from qfedit.db.engine import engine_from_settings, make_engine, session_factory
from qfedit.db.guards import ImmutableRowError
from qfedit.db.models import (
    Alias,
    AliasMove,
    AuditEntry,
    Base,
    Batch,
    BatchFact,
    BatchKind,
    BatchShard,
    BatchStatus,
    FactCapture,
    FactRow,
    FactStatus,
    Model,
    ShardStatus,
    Version,
    VersionFact,
)

__all__ = [
    "Alias",
    "AliasMove",
    "AuditEntry",
    "Base",
    "Batch",
    "BatchFact",
    "BatchKind",
    "BatchShard",
    "BatchStatus",
    "FactCapture",
    "FactRow",
    "FactStatus",
    "ImmutableRowError",
    "Model",
    "ShardStatus",
    "Version",
    "VersionFact",
    "engine_from_settings",
    "make_engine",
    "session_factory",
]
