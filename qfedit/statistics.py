"""Sufficient statistics of a set of facts at one layer.

`A = sum s y y^T` (m x m), `M = sum s e y^T` (d x m) and the count of positions add across facts,
batches and machines, and subtract when a fact is retracted. Keys and residuals at layer `l` do
not depend on layer `l`'s own `down_proj`, so statistics captured on the base model stay exact for
every later version of that layer, provided the errors `e` are taken against the *base* weight.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from qfedit.capture import Capture

FORMAT = "qfedit.statistics/1"


@dataclass(frozen=True)
class Observations:
    """Per-position keys and errors in float64: what the dual solve needs and statistics reduce."""

    keys: torch.Tensor  # (n, m) y_i
    errors: torch.Tensor  # (n, d) e_i
    weights: torch.Tensor  # (n,) s_i

    def __post_init__(self) -> None:
        n = self.keys.shape[0]
        if self.errors.shape[0] != n or self.weights.shape != (n,):
            raise ValueError(
                f"keys {tuple(self.keys.shape)}, errors {tuple(self.errors.shape)} and weights "
                f"{tuple(self.weights.shape)} must have the same number of rows"
            )

    @staticmethod
    def from_capture(capture: Capture, weight: torch.Tensor) -> Observations:
        """Errors against `weight` (d x m), the base model's `down_proj` of the captured layer."""
        return Observations(
            keys=capture.keys_without.to(torch.float64),
            errors=capture.errors(weight),
            weights=capture.weights.to(device=capture.keys_without.device, dtype=torch.float64),
        )

    @property
    def scaled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(S^1/2 Y, S^1/2 E)`: weighted least squares as plain least squares."""
        root = self.weights.sqrt().unsqueeze(1)
        return root * self.keys, root * self.errors


@dataclass(frozen=True)
class Statistics:
    keys_gram: torch.Tensor  # A (m, m) float64
    cross: torch.Tensor  # M (d, m) float64
    positions: int
    layer: int
    fingerprint: str

    def __post_init__(self) -> None:
        m = self.keys_gram.shape[0]
        if self.keys_gram.shape != (m, m) or self.cross.ndim != 2 or self.cross.shape[1] != m:
            raise ValueError(
                f"A {tuple(self.keys_gram.shape)} and M {tuple(self.cross.shape)} do not fit (m x m, d x m)"
            )
        if self.positions < 0:
            raise ValueError(f"statistics with {self.positions} positions: subtracted more than was added")

    @staticmethod
    def from_observations(obs: Observations, layer: int, fingerprint: str) -> Statistics:
        keys, errors = obs.scaled
        return Statistics(
            keys_gram=keys.T @ keys,
            cross=errors.T @ keys,
            positions=int(obs.keys.shape[0]),
            layer=layer,
            fingerprint=fingerprint,
        )

    @staticmethod
    def zeros(d: int, m: int, layer: int, fingerprint: str) -> Statistics:
        return Statistics(
            torch.zeros(m, m, dtype=torch.float64),
            torch.zeros(d, m, dtype=torch.float64),
            0,
            layer,
            fingerprint,
        )

    def _check_compatible(self, other: Statistics) -> None:
        if (self.layer, self.fingerprint) != (other.layer, other.fingerprint):
            raise ValueError(
                f"statistics of layer {other.layer} on base {other.fingerprint[:12]} cannot be combined with "
                f"layer {self.layer} on base {self.fingerprint[:12]}"
            )
        if self.cross.shape != other.cross.shape:
            raise ValueError(f"M shapes {tuple(self.cross.shape)} and {tuple(other.cross.shape)} differ")

    def __add__(self, other: Statistics) -> Statistics:
        self._check_compatible(other)
        return Statistics(
            self.keys_gram + other.keys_gram.to(self.keys_gram.device),
            self.cross + other.cross.to(self.cross.device),
            self.positions + other.positions,
            self.layer,
            self.fingerprint,
        )

    def __sub__(self, other: Statistics) -> Statistics:
        self._check_compatible(other)
        return Statistics(
            self.keys_gram - other.keys_gram.to(self.keys_gram.device),
            self.cross - other.cross.to(self.cross.device),
            self.positions - other.positions,
            self.layer,
            self.fingerprint,
        )

    def to_bytes(self) -> bytes:
        metadata = {
            "format": FORMAT,
            "positions": str(self.positions),
            "layer": str(self.layer),
            "fingerprint": self.fingerprint,
        }
        tensors = {"A": self.keys_gram.contiguous().cpu(), "M": self.cross.contiguous().cpu()}
        return save(tensors, metadata=metadata)

    @staticmethod
    def from_bytes(data: bytes, where: str = "statistics") -> Statistics:
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__", {})
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{where}: not a qfedit statistics file (metadata {json.dumps(metadata)[:200]})")
        tensors = load(data)
        return Statistics(
            keys_gram=tensors["A"],
            cross=tensors["M"],
            positions=int(metadata["positions"]),
            layer=int(metadata["layer"]),
            fingerprint=metadata["fingerprint"],
        )

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    @staticmethod
    def load(path: Path) -> Statistics:
        return Statistics.from_bytes(path.read_bytes(), str(path))
