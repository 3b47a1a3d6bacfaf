"""Deltas: the changed tensors of a version, as weight differences under their parameter names.

A delta file is safetensors (never pickle) holding `dW` in float32, in the stored parameter's
layout, e.g. `model.layers.23.mlp.down_proj.weight`, with metadata naming the format
(`qfedit.delta/1`) and the base weights it was solved for. `Delta.to_bytes` writes it and
`Delta.from_bytes` is its one reader (`Delta.load` reads a file's bytes and parses those).
Applying keeps the original tensors, so reverting restores them bitwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from qfedit.errors import InvalidInputError
from qfedit.modeling import LoadedModel
from qfedit.tensorfile import metadata_of

FORMAT = "qfedit.delta/1"


class DeltaMismatchError(InvalidInputError):
    """A delta that does not belong to the loaded base model."""


@dataclass(frozen=True)
class Delta:
    tensors: Mapping[str, torch.Tensor]
    base_fingerprint: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Layer, rule, hyper-parameters, fact-set digest, norms: JSON-serialisable values."""

    def to_bytes(self) -> bytes:
        header = {"format": FORMAT, "base_fingerprint": self.base_fingerprint}
        header.update({key: json.dumps(value) for key, value in self.metadata.items()})
        tensors = {name: t.detach().to(torch.float32).contiguous().cpu() for name, t in self.tensors.items()}
        return save(tensors, metadata=header)

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "delta") -> Delta:
        """The delta `to_bytes` wrote; anything else (bare tensors included) is a ValueError naming `where`."""
        header = metadata_of(data, where)
        if header.pop("format", None) != FORMAT or "base_fingerprint" not in header:
            raise InvalidInputError(f"{where}: not a qfedit delta ({FORMAT} with a base fingerprint)")
        fingerprint = header.pop("base_fingerprint")
        return cls(load(data), fingerprint, {key: json.loads(value) for key, value in header.items()})

    @classmethod
    def load(cls, path: Path) -> Delta:
        return cls.from_bytes(Path(path).read_bytes(), str(path))

    def check_base(self, loaded: LoadedModel) -> None:
        if self.base_fingerprint != loaded.fingerprint:
            raise DeltaMismatchError(
                f"delta was made for base weights {self.base_fingerprint}, the loaded model is {loaded.fingerprint}"
            )
        parameters = dict(loaded.model.named_parameters())
        for name, tensor in self.tensors.items():
            if name not in parameters:
                raise DeltaMismatchError(f"delta changes {name!r}, which the loaded model does not have")
            if tuple(parameters[name].shape) != tuple(tensor.shape):
                raise DeltaMismatchError(
                    f"delta for {name!r} is {tuple(tensor.shape)}, the parameter is {tuple(parameters[name].shape)}"
                )


def merged(weight: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """`round(float32(W) + dW)`: the one way a delta enters weights, so that applying, serving
    and exporting a version give bitwise the same tensors. The sum is taken in float32 at least
    and rounded once to the weight's dtype."""
    work = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(work) + change.to(device=weight.device, dtype=work)).to(weight.dtype)


class AppliedDelta:
    """A delta applied in place; `revert()` puts the original tensors back bit for bit."""

    def __init__(self, loaded: LoadedModel, delta: Delta) -> None:
        delta.check_base(loaded)
        parameters = dict(loaded.model.named_parameters())
        self._originals: dict[str, torch.Tensor] = {}
        self._parameters = parameters
        with torch.no_grad():
            for name, change in delta.tensors.items():
                parameter = parameters[name]
                self._originals[name] = parameter.detach().clone()
                parameter.copy_(merged(parameter, change))
        self.delta = delta

    def revert(self) -> None:
        with torch.no_grad():
            for name, original in self._originals.items():
                self._parameters[name].copy_(original)
        self._originals.clear()


@contextmanager
def applied(loaded: LoadedModel, delta: Delta | None) -> Iterator[LoadedModel]:
    """`with applied(loaded, delta):` the model has the delta; afterwards it is the base again."""
    if delta is None:
        yield loaded
        return
    handle = AppliedDelta(loaded, delta)
    try:
        yield loaded
    finally:
        handle.revert()
