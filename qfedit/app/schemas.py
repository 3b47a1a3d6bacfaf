"""Request and response bodies of the HTTP API, separate from the database tables.

Every string a client sends that reaches the database is `Text` (no NUL, valid Unicode: what
PostgreSQL can store); every id is bounded to the database's integer range, so malformed input
is a 422 naming the field rather than a database error.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from qfedit.facts import storable
from qfedit.pipeline.settings import EditOverrides
from qfedit.registry.aliases import PRODUCTION
from qfedit.registry.base import UNSET

DB_INT_MAX = 2**31 - 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def _utc_moment(value: datetime) -> datetime:
    # A naive time is UTC; an aware one near year 1 or 9999 could not even be converted to UTC.
    value = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if not 1970 <= value.year <= 9000:
        raise ValueError("must be between the years 1970 and 9000")
    return value.astimezone(timezone.utc)


def _version_ref(value: str) -> str:
    if value.isdigit() and int(value) > DB_INT_MAX:
        raise ValueError(f"version number must be at most {DB_INT_MAX}")
    return value


DbId = Annotated[int, Field(ge=1, le=DB_INT_MAX)]
Text = Annotated[str, AfterValidator(storable)]
Moment = Annotated[datetime, AfterValidator(_utc_moment)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=2000), AfterValidator(storable)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
# A version number or an alias name; `production` if not given where one is optional.
VersionRef = Annotated[str, StringConstraints(pattern=NAME_PATTERN), AfterValidator(_version_ref)]
HyperValue = bool | int | Annotated[float, Field(allow_inf_nan=False)] | Text | None


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- errors and health -------------------------------------------------------------------------


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. `invalid`, `not_found`, `too_large`.")
    message: str
    field: str | None = Field(None, description="The request field at fault, e.g. `body.fact_ids`.")
    errors: list[FieldError] | None = None


# The refusals a route may answer with, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 415, 422, 503)
}


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    database: bool
    broker: bool
    detail: dict[str, str] = Field(default_factory=dict)


# -- models and facts --------------------------------------------------------------------------


class ModelOut(_Out):
    id: int
    name: str
    source: str
    revision: str | None
    fingerprint: str
    default_layer: int | None
    created_at: datetime
    created_by: str
    description: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class NotesPatch(BaseModel):
    """A change to a model's or a version's description and tags; fields left out stay."""

    model_config = ConfigDict(extra="forbid")

    description: Annotated[Text | None, Field(max_length=4000)] = Field(
        default=None, description='New description; null or absent leaves it, "" clears it.'
    )
    tags: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[Text, Field(max_length=256)]] = (
        Field(default_factory=dict, description="Tags to set (key -> value).")
    )
    remove_tags: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=32, description="Tag keys to remove."
    )

    def changes(self) -> dict[str, Any]:
        """The change as `qfedit.registry.notes`' describe functions take it (an absent or null
        description leaves it)."""
        description = UNSET if self.description is None else self.description
        return {"description": description, "tags": self.tags, "remove_tags": self.remove_tags}


class VersionPatch(NotesPatch):
    archived: bool | None = Field(
        default=None,
        description="Archive (true) or restore (false): an archived version leaves listings by "
        "default and keeps its checkpoint; an alias's version cannot be archived.",
    )
    reason: Annotated[Text | None, Field(max_length=2000)] = Field(
        default=None, description="Why it is archived or restored (required with `archived`)."
    )


class FactOut(_Out):
    id: int
    model_id: int
    external_id: str | None
    question: str
    answer: str
    context: str
    subject: str | None
    significance: list[float] | None
    paraphrases: list[JsonValue]
    neighbors: list[JsonValue]
    status: Literal["pending", "applied", "retracted"]
    superseded_by: int | None = Field(
        default=None, description="The fact that states a newer answer to this fact's question."
    )
    source: str
    source_line: int | None
    content_hash: str
    created_at: datetime
    truncated: list[str] = Field(
        default_factory=list,
        description="Fields a list cut short (a text to its first characters, a list too long to show "
        "left empty); `GET /v1/facts/{id}` has the fact whole.",
    )


class VersionRefOut(BaseModel):
    number: int
    label: str


class FactDetail(FactOut):
    model: str
    supersedes: list[int] = Field(default_factory=list, description="Older facts this one replaces.")
    versions: list[VersionRefOut] = Field(description="Every version whose fact set holds this fact.")


class FactPage(BaseModel):
    items: list[FactOut]
    limit: int
    offset: int
    next_offset: int | None = Field(
        default=None,
        description="Set when the page ended at the response's size budget with more facts to list: "
        "ask again from here.",
    )


class ImportReject(BaseModel):
    source: str
    line: int
    field: str
    reason: str
    record: JsonValue


class ImportResult(BaseModel):
    model: str
    source: str
    format: str
    read: int
    imported: int
    duplicates: int
    rejected: int
    stopped: str | None = Field(description="Set when reading stopped early; records before it are in.")
    rejects: list[ImportReject]
    rejects_truncated: bool = Field(description="True when `rejected` is more than the rejects listed.")


class RetractRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fact_ids: list[DbId] = Field(min_length=1)
    reason: Reason


# -- batches -----------------------------------------------------------------------------------


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fact_ids: list[DbId] | None = Field(
        None, description="Facts to edit in; omitted or null means every pending fact of the model."
    )
    hyperparameters: EditOverrides | None = Field(
        None,
        description="Overrides of the model's edit settings for this batch, e.g. "
        '`{"solve": {"lam": 10}, "layer": 20}`; merged with the model\'s settings and resolved '
        "once, at submission (the batch's `settings`).",
    )


class UnteachableFact(BaseModel):
    fact_id: int
    context_answer: str | None = Field(description="What the model answers with the fact in context.")
    reason: str = Field(
        default="", description="Unteachable, or refused before capture as too large for the model."
    )


class BatchOut(BaseModel):
    id: int
    model: str
    kind: str
    status: str
    progress: float = Field(description="0 to 1.")
    attempts: int
    error: str | None
    waiting: str | None = Field(
        default=None,
        description="What a task of the batch is waiting for, while it waits (CPU cores that other tasks hold).",
    )
    activity: str | None = Field(
        default=None,
        description='What its task is doing within the status, while active ("solving layer 24 (5 of 10)", '
        '"evaluating: ...").',
    )
    elapsed_s: float = Field(description="Seconds since it was submitted, to its end or to now.")
    reason: str | None
    requested_by: str
    idempotency_key: str | None
    hyperparameters: dict[str, JsonValue] = Field(description="The overrides as submitted, nested.")
    settings: dict[str, JsonValue] | None = Field(
        description="What the batch runs with: the model's settings when it was submitted, with the "
        "overrides over them. Configuring the model later changes later batches only."
    )
    fact_count: int
    captured: int = Field(description="Facts whose observations are stored, of `fact_count`.")
    version: str | None = Field(description="The version this batch published, once it has.")
    unteachable: list[UnteachableFact] = Field(
        default_factory=list,
        description="Captured facts the base model does not answer right even with the fact as its "
        "system message (QF's teacher), by id; the first 100.",
    )
    excluded: list[int] = Field(
        default_factory=list, description="Facts left out of the version (the model's `unteachable` setting)."
    )
    superseded: dict[str, int] | None = Field(
        default=None,
        description="Older facts the version replaced with this batch's newer answers, and the preservation "
        "transcripts and evaluation facts stating the old answers that were left out "
        "(`facts`, `preservation_left_out`, `evaluation_left_out`).",
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class BatchPage(BaseModel):
    items: list[BatchOut]
    limit: int
    offset: int


# -- versions ----------------------------------------------------------------------------------


class VersionOut(BaseModel):
    id: int
    model: str
    number: int
    label: str
    parent: int | None
    batch: int | None
    created_at: datetime
    created_by: str
    reason: str
    layer: int | None
    rule: str | None
    hyperparameters: dict[str, JsonValue]
    relative_update_norm: float | None = Field(description="|dW| / |W|.")
    metrics: dict[str, JsonValue]
    fact_count: int
    fact_set_digest: str
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    aliases: list[str]
    description: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    archived: bool = Field(default=False, description="Out of listings by default; its checkpoint is kept.")


class VersionDetail(VersionOut):
    facts_added: int = Field(description="Facts in this version and not in its parent.")
    facts_removed: int = Field(description="Facts in its parent and not in this version.")


class MetricChange(BaseModel):
    old: JsonValue
    new: JsonValue


class FactUpdate(BaseModel):
    old: FactOut
    new: FactOut


class VersionDiffOut(BaseModel):
    old: str
    new: str
    facts_added_total: int
    facts_removed_total: int
    facts_added: list[FactOut] = Field(description="At most `limit` of them.")
    facts_removed: list[FactOut] = Field(description="At most `limit` of them.")
    facts_updated_total: int = 0
    facts_updated: list[FactUpdate] = Field(
        default_factory=list,
        description="A fact superseded by one that states a new answer to its question; at most `limit`.",
    )
    metric_changes: dict[str, MetricChange]
    weight_difference_norm: float | None = Field(description="|W_new - W_old| (Frobenius).")


# -- aliases and audit -------------------------------------------------------------------------


class AliasOut(BaseModel):
    model: str
    name: str
    version: int
    label: str
    revision: int
    updated_at: datetime


class AliasMoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: VersionRef = Field(description="A version number, or another alias to copy.")
    reason: Reason
    expect_revision: Annotated[int, Field(ge=0, le=DB_INT_MAX)] | None = Field(
        None,
        description="Move only if the alias is at this revision; null: only if it does not exist yet. "
        "Omitted: move whatever the revision.",
    )


class AliasMoveOut(BaseModel):
    moved_at: datetime
    moved_by: str
    from_version: int | None
    to_version: int
    reason: str


class AuditOut(_Out):
    id: int
    at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    details: dict[str, Any]
    model_id: int | None = None


# -- generation --------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: Annotated[str, StringConstraints(min_length=1), AfterValidator(storable)]
    context: Text | None = Field(None, description="Instruction given as the system message.")
    version: VersionRef = Field(PRODUCTION, description="A version number or an alias.")
    max_new_tokens: int = Field(24, ge=1, le=256)


class GenerateResponse(BaseModel):
    model: str
    version: str = Field(description="The version that produced the answer, e.g. `qwen@3`.")
    number: int
    answer: str
