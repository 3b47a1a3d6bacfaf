"""Hyper-parameters of an edit: frozen, validated, and saved inside every delta and version."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Which key positions of a transcript go into the preservation covariance (see qfedit.covariance).
PreservePositions = Literal["answer", "all"]

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

    layer: int = Field(ge=0)
    solve: SolveConfig = SolveConfig()
    include_eos: bool = True
    covariance_samples: int = Field(
        default=20_000, gt=0, le=10_000_000, description="key positions in the preservation covariance"
    )
    preserve_positions: PreservePositions = Field(
        default="answer",
        description="a transcript's positions in the preservation covariance: its answer's, or all",
    )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> EditConfig:
        return EditConfig.model_validate_json(text)
