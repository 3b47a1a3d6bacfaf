"""A model's settings: the `EditConfig` that determines its deltas, beside how batches are judged,
promoted and cut into tasks. Stored on the model row; a batch's hyper-parameters override them,
and the result is resolved once, at submission, and stored on the batch (`batch_settings`).

Stored and submitted settings may be written flat, as before `edit` was its own object
(`{"layer": 4, "solve": {"lam": 60}}`), or nested (`{"edit": {"layer": 4, ...}}`); both mean the
same, and the flat keys are moved under `edit` before validation.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qfedit.db.models import Batch, Model
from qfedit.errors import InvalidInputError
from qfedit.hparams import CAPTURE_BATCH, CAPTURE_SHARD, EditConfig, SolveConfig

_EDIT_KEYS = frozenset(EditConfig.model_fields)


class ModelSettings(BaseModel):
    """How a model's batches are edited (`edit`) and judged; stored on the model row."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edit: EditConfig
    preservation_corpus: list[str] = Field(
        default_factory=list,
        description="files of text the edit must leave alone: facts JSONL (question/answer transcripts) "
        "or text lines; default: known_facts",
    )
    known_facts: str | None = Field(default=None, description="facts JSONL the model knows, for evaluation")
    unknown_questions: str | None = Field(default=None, description="facts JSONL of unknown-entity questions")
    known_sample: int = Field(default=200, gt=0, le=1_000_000)
    eval_sample: int | None = Field(
        default=None,
        gt=0,
        description="edited facts evaluated per batch, a seeded random sample (greedy generation "
        "over every fact and paraphrase is most of a large batch's time); None: all of them",
    )
    abstention: str = "I do not know."
    unteachable: Literal["exclude", "include"] = Field(
        default="exclude",
        description="facts the base model does not answer right even with the fact as its system "
        "message (QF's teacher): left out of the version and named on the batch (exclude), or "
        "written in as the model reads them (include)",
    )
    promote: dict[str, float] | None = Field(
        default=None, description="minimum metrics for moving `production` automatically; None: never"
    )
    # Upper bounds keep one setting from asking a worker for unbounded memory.
    shard_size: int = Field(default=CAPTURE_SHARD, gt=0, le=10_000, description="facts per capture task")
    capture_batch_size: int = Field(default=CAPTURE_BATCH, gt=0, le=1024)

    @field_validator("promote")
    @classmethod
    def _real_thresholds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # `{}` would pass every version, NaN none: neither is a policy anyone meant.
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one metric threshold, or null for never")
        for metric, threshold in value.items():
            if not math.isfinite(threshold):
                raise ValueError(f"the threshold of {metric!r} must be a finite number")
        return value

    def corpus(self) -> list[str]:
        """The preservation corpus's files: the configured ones, else the known facts."""
        return self.preservation_corpus or ([self.known_facts] if self.known_facts else [])


def _partial(config: type[BaseModel], name: str, **inner: Any) -> Any:
    """`config` with every field optional and unset by default: an override states only what it
    changes, and the defaults stay in `config` alone (the merge validates the result)."""
    fields: dict[str, Any] = {}
    for key, info in config.model_fields.items():
        annotation: Any = inner.get(key, info.annotation)
        fields[key] = (annotation | None, Field(default=None, description=info.description))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


_SolveOverrides = _partial(SolveConfig, "SolveOverrides")
_EditFields = _partial(EditConfig, "EditFields", solve=_SolveOverrides)


class EditOverrides(_EditFields):  # type: ignore[misc,valid-type]
    """A batch's overrides of its model's edit settings, e.g. `{"solve": {"lam": 10}, "layer": 20}`:
    only the fields given change; `{"edit": {...}}` (the stored form) is read the same."""

    @model_validator(mode="before")
    @classmethod
    def _edit_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and set(data) == {"edit"} and isinstance(data["edit"], dict):
            return data["edit"]
        if isinstance(data, dict):
            for key in data:
                if key in ModelSettings.model_fields and key != "edit":
                    raise PydanticCustomError(
                        "model_setting",
                        "{key} is a model setting (`qfedit model configure`): a batch may override "
                        "only its edit settings",
                        {"key": key},
                    )
        return data

    def stored(self) -> dict[str, Any]:
        """The nested form batches store: `{"edit": {...}}` with the fields given, nothing else."""
        given = self.model_dump(mode="json", exclude_unset=True)
        return {"edit": given} if given else {}


def nested(raw: dict[str, Any] | None) -> dict[str, Any]:
    """`raw` with its flat edit keys (`layer`, `solve`, ...) moved under `edit`."""
    raw = dict(raw or {})
    edit = raw.pop("edit", None)
    edit = dict(edit) if isinstance(edit, dict) else ({} if edit is None else edit)
    for key in _EDIT_KEYS & raw.keys():
        value = raw.pop(key)
        if isinstance(edit, dict):
            edit[key] = merged(edit[key], value) if isinstance(edit.get(key), dict) else value
    if edit != {}:
        raw["edit"] = edit
    return raw


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, groups merged key by key."""
    result = dict(base)
    for key, value in override.items():
        result[key] = (
            merged(result[key], value)
            if isinstance(value, dict) and isinstance(result.get(key), dict)
            else value
        )
    return result


def validate_settings(
    raw: dict[str, Any] | None, *, default_layer: int | None = None, field: str = "settings"
) -> ModelSettings:
    """Settings from their stored or submitted form (flat or nested); the edit layer defaults to
    `default_layer`. A refusal names the field, under `field`."""
    nested_raw = nested(raw)
    edit = nested_raw.setdefault("edit", {})
    if isinstance(edit, dict) and not {"layer", "layers"} & edit.keys() and default_layer is not None:
        edit["layer"] = default_layer
    try:
        return ModelSettings.model_validate(nested_raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if where == "edit.layer" and first["type"] == "missing":
            raise InvalidInputError(
                "no edit layer: register the model with --layer or set edit.layer",
                field=f"{field}.edit.layer",
            ) from None
        raise InvalidInputError(
            f"field '{field}.{where}': {first['msg']}", field=f"{field}.{where}"
        ) from None


def resolve(
    stored: dict[str, Any] | None,
    overrides: dict[str, Any] | None = None,
    *,
    default_layer: int | None = None,
    field: str = "hyperparameters",
) -> ModelSettings:
    """A model's stored settings with a batch's overrides over them (e.g. `{"solve": {"lam": 10}}`):
    what the batch runs with, resolved once when it is submitted (`Batch.settings`)."""
    base, override = nested(stored), nested(overrides)
    edit_override = override.get("edit")
    if isinstance(edit_override, dict) and {"layer", "layers"} & edit_override.keys():
        # Overridden layers name their own top layer, and an overridden layer edits that layer
        # alone: neither is bound by the model's layer or spread.
        base["edit"] = {k: v for k, v in dict(base.get("edit") or {}).items() if k not in ("layer", "layers")}
    return validate_settings(merged(base, override), default_layer=default_layer, field=field)


def model_settings(
    model: Model, overrides: dict[str, Any] | None = None, *, field: str = "hyperparameters"
) -> ModelSettings:
    """The model's current settings with `overrides` over them (`resolve`)."""
    try:
        return resolve(model.settings, overrides, default_layer=model.default_layer, field=field)
    except InvalidInputError as error:
        if error.field and error.field.endswith("edit.layer") and "no edit layer" in str(error):
            raise InvalidInputError(f"model {model.name!r} has {error}", field=error.field) from None
        raise


def check_overrides(overrides: dict[str, Any] | None, *, field: str = "hyperparameters") -> None:
    """A batch may change how its edit is made, never policy or files: `promote`, corpora and
    evaluation sets are the model's settings, changed with `qfedit model configure` and audited."""
    for key in nested(overrides):
        if key != "edit":
            raise InvalidInputError(
                f"field '{field}.{key}': a batch may override only its edit settings "
                f"({', '.join(sorted(_EDIT_KEYS))}); {key} is a model setting (`qfedit model configure`)",
                field=f"{field}.{key}",
            )


def batch_settings(batch: Batch) -> ModelSettings:
    """The settings `batch` was submitted with: every step, view and version reads these, so
    `qfedit model configure` during a batch changes later batches only."""
    if batch.settings is None:
        raise InvalidInputError(
            f"batch {batch.id} has no resolved settings: its model's settings did not validate when "
            "migration 0011 resolved them; submit the batch again",
            field="settings",
        )
    return ModelSettings.model_validate(batch.settings)


def layers_label(settings: dict[str, Any], default_layer: int | None) -> str:
    """The layers a model's batches edit, as `4` or `0-4`; `-` when its settings name none."""
    try:
        layers = validate_settings(settings, default_layer=default_layer).edit.edited_layers
    except InvalidInputError:
        return "-"
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(x) for x in layers)
