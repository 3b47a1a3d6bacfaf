"""Choosing the edit layer by measurement.

An edit can only move what the layer's MLP output carries: in a layer before the one where
attention has read the answer out of the context, the with-context keys hold no answer to copy,
and the edit teaches nothing. So each candidate layer is tried with a small probe edit, and the
earliest layer whose edit works as well as the best one is recommended.
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
    questions = [f.question for f in facts]
    scans = []
    for layer in candidates:
        config = EditConfig(layer=layer, solve=solve)
        try:
            result = make_delta(loaded, facts, config, preservation=(preservation or {}).get(layer))
        except IllConditionedError as error:
            scans.append(LayerScan(layer, 0.0, None, str(error)))
            continue
        with applied(loaded, result.delta):
            answers = answer_batch(loaded, questions)
        hits = [contains(a, f.answer) for a, f in zip(answers, facts, strict=True)]
        scans.append(LayerScan(layer, sum(hits) / len(hits), result.solve.relative_norm))
    return scans


def recommend_layer(scans: Sequence[LayerScan], tolerance: float = 0.05) -> int:
    """The earliest layer within `tolerance` of the best efficacy: earlier layers leave more of
    the network after the edit to generalise it to paraphrases."""
    if not scans:
        raise InvalidInputError("no layers were scanned")
    best = max(scan.efficacy for scan in scans)
    return next(scan.layer for scan in scans if scan.efficacy >= best - tolerance)
