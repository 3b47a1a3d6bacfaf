"""Choosing the edit layer by measurement.

An edit can only move what the layer's MLP output carries: in a layer before the one where
attention has read the answer out of the context, the with-context keys hold no answer to copy,
and the edit teaches nothing. So each candidate layer is tried with a small probe edit, and the
earliest layer whose edit works as well as the best one is recommended.

An edit spread over several layers (`EditConfig.layers`) takes its target at the top one, which
must be such a layer; below it, every layer can carry a share, and a wider spread changes each
layer less (on the demo model it keeps far more of what the model knew at equal efficacy). So
spreads ending at the recommended layer are probed downwards, and the widest that still works
as well as the best is recommended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qfedit.delta import applied
from qfedit.edit import make_delta
from qfedit.errors import InvalidInputError
from qfedit.evaluate import contains
from qfedit.facts import Fact
from qfedit.generate import answer_batch
from qfedit.hparams import EditConfig, SolveConfig
from qfedit.modeling import LoadedModel
from qfedit.solve import IllConditionedError, Preservation


@dataclass(frozen=True)
class LayerScan:
    layer: int
    efficacy: float
    relative_norm: float | None
    error: str | None = None


@dataclass(frozen=True)
class SpreadScan:
    layers: tuple[int, ...]
    efficacy: float
    relative_norm: float | None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])


def _probe(
    loaded: LoadedModel, facts: Sequence[Fact], config: EditConfig, preservation: object
) -> tuple[float, float]:
    """(efficacy, |dW|/|W|) of one probe edit."""
    result = make_delta(loaded, facts, config, preservation=preservation)  # type: ignore[arg-type]
    with applied(loaded, result.delta):
        answers = answer_batch(loaded, [f.question for f in facts])
    hits = [contains(a, f.answer) for a, f in zip(answers, facts, strict=True)]
    return sum(hits) / len(hits), result.solve.relative_norm


def scan_layers(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    solve: SolveConfig,
    *,
    layers: Sequence[int] | None = None,
    preservation: dict[int, Preservation] | None = None,
) -> list[LayerScan]:
    """Efficacy of a probe edit of `facts` at each layer (all layers by default)."""
    candidates = list(layers) if layers is not None else list(range(loaded.num_layers))
    scans = []
    for layer in candidates:
        config = EditConfig(layer=layer, solve=solve)
        try:
            efficacy, norm = _probe(loaded, facts, config, (preservation or {}).get(layer))
        except IllConditionedError as error:
            scans.append(LayerScan(layer, 0.0, None, str(error)))
            continue
        scans.append(LayerScan(layer, efficacy, norm))
    return scans


def scan_spreads(
    loaded: LoadedModel, facts: Sequence[Fact], solve: SolveConfig, top: int, *, widest: int | None = None
) -> list[SpreadScan]:
    """Efficacy of a probe edit spread over `low..top`, for `low` from `top` down to 0 (or to
    `top - widest + 1`)."""
    loaded.architecture.check_layer(loaded.model, top)
    bottom = 0 if widest is None else max(0, top - widest + 1)
    scans = []
    for low in range(top, bottom - 1, -1):
        spread = tuple(range(low, top + 1))
        config = EditConfig(layer=top, layers=spread if len(spread) > 1 else None, solve=solve)
        try:
            efficacy, norm = _probe(loaded, facts, config, None)
        except IllConditionedError as error:
            scans.append(SpreadScan(spread, 0.0, None, str(error)))
            continue
        scans.append(SpreadScan(spread, efficacy, norm))
    return scans


def recommend_layer(scans: Sequence[LayerScan], tolerance: float = 0.05) -> int:
    """The earliest layer within `tolerance` of the best efficacy: earlier layers leave more of
    the network after the edit to generalise it to paraphrases."""
    if not scans:
        raise InvalidInputError("no layers were scanned")
    best = max(scan.efficacy for scan in scans)
    return next(scan.layer for scan in scans if scan.efficacy >= best - tolerance)


def recommend_spread(scans: Sequence[SpreadScan], tolerance: float = 0.05) -> tuple[int, ...]:
    """The widest spread within `tolerance` of the best efficacy: each layer then changes least."""
    if not scans:
        raise InvalidInputError("no spreads were scanned")
    best = max(scan.efficacy for scan in scans)
    return max((s for s in scans if s.efficacy >= best - tolerance), key=lambda s: len(s.layers)).layers
