"""Hyper-parameters of an edit: frozen, validated, and saved inside every delta and version."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Which key positions of a transcript go into the preservation covariance (see qfedit.covariance).
Target = Literal["answer", "teacher"]
TargetWords = Literal["all", "divergent"]
PreservePositions = Literal["answer", "all"]

# Facts captured together, and sequences per forward pass. Capture pads and batches sequences by
# length within a shard, so these decide the float rounding of a capture: the queue's defaults
# (`ModelSettings.shard_size`, `capture_batch_size`) are these too.
CAPTURE_SHARD = 64
CAPTURE_BATCH = 16

Rule = Literal["seed", "preserve"]
SolveForm = Literal["auto", "primal", "dual"]


class SolveConfig(BaseModel):
    """How `dW` is solved from captured statistics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: Rule = "preserve"
    lam: float = Field(default=1.0, gt=0, description="weight of preservation, relative to the edit")
    ridge: float = Field(
        default=1e-2,
        ge=0,
        description="added to the preservation covariance, as a fraction of its mean diagonal; a "
        "covariance from a narrow corpus is near-singular without it",
    )
    max_condition: float = Field(
        default=1e10, gt=1, description="refuse a system worse conditioned than this"
    )
    form: SolveForm = "auto"


class EditConfig(BaseModel):
    """Everything that determines a delta, besides the base weights and the facts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(
        ge=0, description="the edited layer; with `layers`, the top one, whose output is the target"
    )
    layers: tuple[int, ...] | None = Field(
        default=None,
        description="edit several layers, lowest first, ending at `layer` (the sequential spread, "
        "qfedit.edit.spread_delta); None: `layer` alone",
    )
    solve: SolveConfig = SolveConfig()
    include_eos: bool = True
    covariance_samples: int = Field(
        default=20_000, gt=0, le=10_000_000, description="key positions in the preservation covariance"
    )
    preserve_positions: PreservePositions = Field(
        default="answer",
        description="a transcript's positions in the preservation covariance: its answer's, or all",
    )
    target: Target = Field(
        default="answer",
        description="what is teacher-forced: the fact's answer, or the teacher's own answer with the "
        "fact in context, cut after the sentence that states it (qfedit.teachable.teacher_answer)",
    )
    target_words: TargetWords = Field(
        default="all",
        description="with the teacher's target: every word of it, or only the words the model without "
        "the fact does not already predict (divergent; qfedit.teachable.divergent_words)",
    )

    phrasings: int = Field(
        default=0,
        ge=0,
        le=4,
        description="more rows per fact: up to this many of the model's own phrasings of its question, "
        "each teacher-forced on the teacher's answer to it (qfedit.teachable.rephrasings); 0: the "
        "imported question alone",
    )
    target_span: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="0: the top layer's whole output with the fact is the target (QF as published); "
        "k > 0: only its logit gaps between the k likeliest next tokens with the fact, the k likeliest "
        "without it, and the taught token (qfedit.span)",
    )
    target_margin: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="with the teacher's target: positions where the model without the fact already "
        "says the taught token, ahead of every other by this many logits, get no error (their keys "
        "stay in the solve, kept as they are); None: every position is moved to the teacher "
        "(qfedit.span.settled)",
    )

    @model_validator(mode="before")
    @classmethod
    def _top_layer(cls, data: Any) -> Any:
        # `layers` alone names the top layer too: `{"layers": [2, 3, 4]}` edits up to layer 4.
        if isinstance(data, dict) and data.get("layers") and "layer" not in data:
            layers = data["layers"]
            if isinstance(layers, list | tuple) and all(isinstance(x, int) for x in layers):
                return {**data, "layer": max(layers)}
        return data

    @model_validator(mode="after")
    def _layers_end_at_layer(self) -> EditConfig:
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers: give at least one layer, or null for `layer` alone")
            if any(x < 0 for x in self.layers):
                raise ValueError(f"layers: {list(self.layers)} has a negative layer")
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers: {list(self.layers)} must be distinct and increasing")
            if self.layers[-1] != self.layer:
                raise ValueError(
                    f"layers: {list(self.layers)} must end at the edit's layer {self.layer} (its output is the target)"
                )
        return self

    @property
    def edited_layers(self) -> tuple[int, ...]:
        """The layers whose `down_proj` changes, lowest first; the last is `layer`."""
        return self.layers if self.layers is not None else (self.layer,)

    def at_layer(self, layer: int) -> EditConfig:
        """This edit as one layer's (its preservation covariance is measured there)."""
        return self.model_copy(update={"layer": layer, "layers": None})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> EditConfig:
        return EditConfig.model_validate_json(text)


def parse_layers(text: str) -> tuple[int, ...]:
    """`2,3,4` or `2-4` as layers (validated further by `EditConfig`)."""
    from qfedit.errors import InvalidInputError

    try:
        if "-" in text.strip().lstrip("-") and "," not in text:
            low, high = (int(part) for part in text.split("-", 1))
            return tuple(range(low, high + 1))
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidInputError(
            f"layers: {text!r} is not a list of layer numbers such as 2,3,4 or 2-4", field="layers"
        ) from None
