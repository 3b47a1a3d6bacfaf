"""Sufficient statistics of a set of facts at one layer.

`A = sum s y y^T` (m x m), `M = sum s e y^T` (d x m) and the count of positions add across facts,
batches and machines, and subtract when a fact is retracted. Keys and residuals at layer `l` do
not depend on layer `l`'s own `down_proj`, so statistics captured on the base model stay exact for
every later version of that layer, provided the errors `e` are taken against the *base* weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from qfedit.capture import Capture
from qfedit.tensorfile import check_format

FORMAT = "qfedit.statistics/1"


# Facts reduced together into one term of a statistics sum. Floating-point addition is not
# associative, so the same facts give bitwise the same statistics only when every path cuts them
# into the same runs, in the same order, before adding: `fact_runs` is that cut.
STATISTICS_RUN = 256


@dataclass(frozen=True)
class Observations:
    """Per-position keys and errors: what the dual solve needs and statistics reduce.

    Values are float32 numbers held in float64 tensors: float32 is what the store keeps, and
    rounding once here makes observations read back from the store equal to fresh ones."""

    keys: torch.Tensor  # (n, m) y_i
    errors: torch.Tensor  # (n, d) e_i
    weights: torch.Tensor  # (n,) s_i
    facts: torch.Tensor | None = None
    """(n,) int64: the fact each row belongs to (an index into a fact list, or a database id);
    rows of one fact are consecutive, in position order."""

    def __post_init__(self) -> None:
        n = self.keys.shape[0]
        if self.errors.shape[0] != n or self.weights.shape != (n,):
            raise ValueError(
                f"keys {tuple(self.keys.shape)}, errors {tuple(self.errors.shape)} and weights "
                f"{tuple(self.weights.shape)} must have the same number of rows"
            )
        if self.facts is not None and self.facts.shape != (n,):
            raise ValueError(f"facts {tuple(self.facts.shape)} must have one entry per row ({n})")

    @staticmethod
    def from_capture(capture: Capture, weight: torch.Tensor, offset: int = 0) -> Observations:
        """Errors against `weight` (d x m), the base model's `down_proj` of the captured layer;
        row `i` belongs to fact `offset + capture.fact_index[i]`."""
        return Observations(
            keys=as_stored(capture.keys_without),
            errors=as_stored(capture.errors(weight)),
            weights=capture.weights.to(device=capture.keys_without.device, dtype=torch.float64),
            facts=capture.fact_index.to(torch.int64) + offset,
        )

    def rows(self, selected: torch.Tensor) -> Observations:
        return Observations(
            self.keys[selected],
            self.errors[selected],
            self.weights[selected],
            self.facts[selected] if self.facts is not None else None,
        )

    @staticmethod
    def concatenate(parts: Sequence[Observations]) -> Observations:
        if not parts:
            raise ValueError("no observations to concatenate")
        facts = [p.facts for p in parts]
        return Observations(
            keys=torch.cat([p.keys for p in parts]),
            errors=torch.cat([p.errors for p in parts]),
            weights=torch.cat([p.weights for p in parts]),
            facts=torch.cat([f for f in facts if f is not None])
            if all(f is not None for f in facts)
            else None,
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
    def accumulate(
        runs: Iterable[Observations], *, d: int, m: int, layer: int, fingerprint: str
    ) -> Statistics:
        """The sum of each run's statistics, added left to right (see `fact_runs`)."""
        total = Statistics.zeros(d, m, layer, fingerprint)
        for run in runs:
            if run.keys.shape[0]:
                total = total + Statistics.from_observations(run, layer, fingerprint)
        return total

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
        metadata = check_format(data, FORMAT, where)
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


def as_stored(tensor: torch.Tensor) -> torch.Tensor:
    """Rounded to float32, what the store keeps, and held in float64 (see `Observations`)."""
    return tensor.to(torch.float32).to(torch.float64)


def fact_runs(
    observations: Observations, facts: Sequence[int], run: int = STATISTICS_RUN
) -> Iterator[Observations]:
    """The rows of `facts`, in that order, cut into runs of `run` facts: the one way statistics
    are reduced, so that a fact set captured at once and one read back from the store sum alike."""
    if observations.facts is None:
        raise ValueError("observations without fact ids cannot be cut into runs")
    order = {fact: index for index, fact in enumerate(facts)}
    if len(order) != len(facts):
        raise ValueError("facts must be distinct")
    ranks = torch.tensor([order.get(int(f), -1) for f in observations.facts.tolist()], dtype=torch.int64)
    if bool((ranks < 0).any()):
        raise ValueError("observations hold rows of facts that were not asked for")
    # A stable sort keeps each fact's rows in position order.
    ranks, permutation = torch.sort(ranks, stable=True)
    for start in range(0, len(facts), run):
        selected = permutation[(ranks >= start) & (ranks < start + run)]
        yield observations.rows(selected)
