"""Tables of everything qfedit knows: base models, facts, edit batches, weight versions, aliases, audit.

Versions, the facts each version holds, alias moves and audit entries are written once and never
changed: `qfedit.db.guards` refuses updates and deletes of them in the ORM, and database triggers
(installed by the migration and by `create_all`) refuse them in SQL.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Constraint names must be deterministic so that migrations can drop and alter them by name
# (SQLite batch mode rebuilds tables and needs every constraint named).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone; this restores it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value!r} has no timezone; qfedit stores UTC")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _key(length: int) -> String:
    """A string compared only for equality: in byte order on PostgreSQL, whose locale-aware
    comparison made up about 15% of a bulk import's server time (migration 0009)."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


class FactStatus(str, enum.Enum):
    PENDING = "pending"
    APPLIED = "applied"
    RETRACTED = "retracted"


class BatchKind(str, enum.Enum):
    EDIT = "edit"
    RETRACT = "retract"


class ShardStatus(str, enum.Enum):
    PENDING = "pending"
    DONE = "done"


class BatchStatus(str, enum.Enum):
    QUEUED = "queued"
    CAPTURING = "capturing"
    SOLVING = "solving"
    EVALUATING = "evaluating"
    PUBLISHED = "published"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: portable, and adding a value later is a
    # constraint change rather than a PostgreSQL `ALTER TYPE` that cannot run in a transaction.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class Model(Base):
    """A registered base model: the weights every version of it is a delta against."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(1000))  # local directory or hub id
    revision: Mapped[str | None] = mapped_column(String(200))
    fingerprint: Mapped[str] = mapped_column(String(64))
    default_layer: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    # How this model's batches are edited and judged (`qfedit.pipeline.settings.ModelSettings`).
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What people say about it (editable, audited: `qfedit.registry.notes`).
    description: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The batch that holds this model's line: set and cleared by conditional updates, so two
    # batches never build on the same parent. No foreign key: batches already reference models.
    active_batch_id: Mapped[int | None] = mapped_column(Integer)


class FactRow(Base):
    """One fact to teach a model; its content hash is unique per model, so imports never duplicate."""

    __tablename__ = "facts"
    __table_args__ = (
        UniqueConstraint("model_id", "content_hash"),
        Index("ix_facts_model_id_status", "model_id", "status"),
        Index("ix_facts_model_id_question_key", "model_id", "question_key"),
        # Supersession looks facts up by external id in every import chunk: without it, each
        # chunk scans the model's facts (import into PostgreSQL fell to ~600 facts/s at 50,000).
        Index("ix_facts_model_id_external_id", "model_id", "external_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    content_hash: Mapped[str] = mapped_column(_key(64))
    external_id: Mapped[str | None] = mapped_column(_key(200))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    context: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    significance: Mapped[list[Any] | None] = mapped_column(JSON)
    paraphrases: Mapped[list[Any]] = mapped_column(JSON, default=list)
    neighbors: Mapped[list[Any]] = mapped_column(JSON, default=list)
    source: Mapped[str] = mapped_column(String(500))  # corpus file the fact first came from
    source_line: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[FactStatus] = mapped_column(_enum(FactStatus, "fact_status"), default=FactStatus.PENDING)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    question_key: Mapped[str | None] = mapped_column(_key(64))
    """`qfedit.facts.question_key` of the question: a later fact with the same key supersedes this one."""
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("facts.id"))
    """The fact that states a newer answer to this fact's question (qfedit.registry.supersede)."""

    model: Mapped[Model] = relationship()


class Batch(Base):
    """An edit job: a set of facts to capture, solve and publish as a new version."""

    __tablename__ = "batches"
    __table_args__ = (CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    status: Mapped[BatchStatus] = mapped_column(
        _enum(BatchStatus, "batch_status"), default=BatchStatus.QUEUED, index=True
    )
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The model's settings with `hyperparameters` over them, resolved at submission in nested form
    # (`qfedit.pipeline.settings.batch_settings`); None only for a batch migration 0011 could not
    # resolve.
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A client retrying a request with the same key gets the same batch instead of a second job.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    # What the key was first used for (sha256 of model, kind, facts, hyper-parameters): the same key
    # with another request is refused, not answered with this batch.
    request_digest: Mapped[str | None] = mapped_column(String(64))
    requested_by: Mapped[str] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # What the batch's task is doing now, within its status ("solving layer 24 (5 of 10)",
    # "evaluating: paraphrases"); cleared when the status changes.
    activity: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    kind: Mapped[BatchKind] = mapped_column(_enum(BatchKind, "batch_kind"), default=BatchKind.EDIT)
    reason: Mapped[str | None] = mapped_column(Text)
    # The version this batch builds on, fixed when it takes the model's line.
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", use_alter=True))
    excluded_facts: Mapped[list[Any] | None] = mapped_column(JSON)
    """Facts of the batch left out of its version, `[{"fact_id", "reason", "context_answer"}]`."""
    waiting: Mapped[str | None] = mapped_column(Text)
    """What a task of the batch is waiting for, while it waits (CPU cores other tasks hold)."""

    model: Mapped[Model] = relationship()


class BatchShard(Base):
    """A slice of a batch's facts captured by one task; the solve starts when all are done."""

    __tablename__ = "batch_shards"
    __table_args__ = (UniqueConstraint("batch_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    fact_ids: Mapped[list[Any]] = mapped_column(JSON)
    status: Mapped[ShardStatus] = mapped_column(
        _enum(ShardStatus, "shard_status"), default=ShardStatus.PENDING
    )
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class FactCapture(Base):
    """Where a fact's captured observations (keys, errors, weights) at one layer of one base live.

    Captured once: a version's statistics are the sum over its facts' observations, so later
    batches and retractions never capture a fact again.
    """

    __tablename__ = "fact_captures"

    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    object_path: Mapped[str] = mapped_column(String(500))  # relative to the store
    object_sha256: Mapped[str] = mapped_column(String(64))
    positions: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    context_answer: Mapped[str | None] = mapped_column(Text)
    """The greedy answer of the base model with the fact as its system message: QF's teacher."""
    teachable: Mapped[bool | None] = mapped_column()
    """Whether that answer contains the fact's answer; None for captures made before it was checked."""
    base_answer: Mapped[str | None] = mapped_column(Text)
    """The base model's greedy answer without the context: what an update of a known fact replaces."""


class BatchFact(Base):
    __tablename__ = "batch_facts"

    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), primary_key=True, index=True)


class Version(Base):
    """An immutable weight version: base weights plus the delta solved from its fact set.

    Number 0 of each model is the base model itself (no checkpoint), so an alias can be moved
    back to the unedited weights.
    """

    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("model_id", "number"),
        CheckConstraint(
            "(checkpoint_path IS NULL) = (checkpoint_sha256 IS NULL)", name="checkpoint_path_with_sha256"
        ),
        CheckConstraint("number >= 0", name="number_non_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    number: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), index=True)
    checkpoint_path: Mapped[str | None] = mapped_column(String(500))  # relative to the store
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    # The summed statistics of the version's fact set (A, M), so a child adds or subtracts only
    # what changed instead of re-reading every fact's observations.
    statistics_path: Mapped[str | None] = mapped_column(String(500))
    statistics_sha256: Mapped[str | None] = mapped_column(String(64))
    layer: Mapped[int | None] = mapped_column(Integer)
    rule: Mapped[str | None] = mapped_column(String(32))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    relative_update_norm: Mapped[float | None] = mapped_column(Float)  # |dW| / |W|
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    fact_set_digest: Mapped[str] = mapped_column(String(64))
    fact_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)

    model: Mapped[Model] = relationship()
    parent: Mapped[Version | None] = relationship(remote_side=[id])
    # The editable part, in a row of its own: a version's row is written once.
    note: Mapped[VersionNote | None] = relationship(viewonly=True, lazy="selectin")

    @property
    def label(self) -> str:
        return f"{self.model.name}@{self.number}"

    @property
    def archived(self) -> bool:
        return self.note is not None and self.note.archived_at is not None


class VersionNote(Base):
    """What people say about a version, beside its write-once row: a description, tags, and
    whether it is archived (out of listings by default; its checkpoint is kept, as every
    version's is while the audit needs it). Changed by `qfedit.registry.notes`, audited."""

    __tablename__ = "version_notes"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    description: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    archived_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200))


class VersionFact(Base):
    """The full fact set of a version (not the change from its parent): a version is a pure function of it."""

    __tablename__ = "version_facts"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), primary_key=True, index=True)


class Alias(Base):
    """A movable name (e.g. `production`) for one version of a model; every move is in `alias_moves`."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    name: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    # Bumped on every move, so a compare-and-set can name the state it expects.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship()
    version: Mapped[Version] = relationship()


class AliasMove(Base):
    __tablename__ = "alias_moves"

    id: Mapped[int] = mapped_column(primary_key=True)
    alias_id: Mapped[int] = mapped_column(ForeignKey("aliases.id"), index=True)
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    to_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)
    moved_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)

    from_version: Mapped[Version | None] = relationship(foreign_keys=[from_version_id])
    to_version: Mapped[Version] = relationship(foreign_keys=[to_version_id])


class AuditEntry(Base):
    """Who did what, when, to which object, and why; append-only."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_object", "object_type", "object_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The model the entry is about (None for the store's own entries): the log filters by it.
    model_id: Mapped[int | None] = mapped_column(Integer, index=True)


class WorkerHeartbeat(Base):
    """A worker process that is (or was lately) consuming queues: written when it starts and every
    few seconds after, removed when it stops. How `batch submit` and `qfedit doctor` tell whether
    anyone will run a batch, without Celery's remote control (off by default: see worker.app)."""

    __tablename__ = "worker_heartbeats"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class TaskStart(Base):
    """A task that started and has not ended: running now, or its worker died in it (out of memory,
    `kill -9`). Written before the task's work and removed when it ends, so the starts of one task
    that no live worker runs count the worker deaths it caused (`qfedit.pipeline.deliveries`)."""

    __tablename__ = "task_starts"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    task: Mapped[str] = mapped_column(String(100))
    """Which of the batch's tasks: `start_batch`, `capture_shard:<shard id>` or `solve_batch`."""
    hostname: Mapped[str] = mapped_column(String(255))
    """The worker that started it, as in `worker_heartbeats`."""
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    handed_on_at: Mapped[datetime | None] = mapped_column()
    """When a live worker found this start's worker dead (its heartbeat stopped) and sent the
    batch on; None while nobody has."""


# Rows of these tables are written once; see `qfedit.db.guards`.
IMMUTABLE_MODELS: tuple[type[Base], ...] = (Version, VersionFact, AliasMove, AuditEntry)
