"""One edit end to end in a process: capture, statistics, solve, delta.

The job queue runs the same steps as separate tasks; this module is what the CLI and the tests
call directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qfedit.capture import Capture, CaptureOptions, capture
from qfedit.covariance import CorpusText, compute_covariance
from qfedit.delta import Delta
from qfedit.facts import Fact, fact_set_digest
from qfedit.hparams import EditConfig
from qfedit.modeling import LoadedModel
from qfedit.solve import Preservation, SolveResult, solve
from qfedit.statistics import Observations, Statistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditResult:
    delta: Delta
    solve: SolveResult
    capture_seconds: float
    solve_seconds: float


def base_weight(loaded: LoadedModel, layer: int) -> torch.Tensor:
    """The layer's `down_proj` as `W` (d x m) in float64, detached from the model."""
    return loaded.architecture.down_proj_weight(loaded.model, layer).detach().to(torch.float64)


def capture_observations(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    config: EditConfig,
    *,
    labels: Sequence[str] | None = None,
    chunk: int = 256,
    batch_size: int = 16,
) -> Observations:
    """Capture in chunks of facts so that activations of a large batch are never all held at once."""
    weight = base_weight(loaded, config.layer)
    options = CaptureOptions(batch_size=batch_size, include_eos=config.include_eos)
    names = list(labels) if labels is not None else [f.id or f"fact {i + 1}" for i, f in enumerate(facts)]
    parts: list[Observations] = []
    for start in range(0, len(facts), chunk):
        part: Capture = capture(
            loaded,
            facts[start : start + chunk],
            config.layer,
            labels=names[start : start + chunk],
            options=options,
        )
        parts.append(Observations.from_capture(part, weight))
    return Observations(
        keys=torch.cat([p.keys for p in parts]),
        errors=torch.cat([p.errors for p in parts]),
        weights=torch.cat([p.weights for p in parts]),
    )


def preservation_for(
    loaded: LoadedModel, config: EditConfig, texts: Sequence[CorpusText], cache_dir: Path | None = None
) -> Preservation:
    covariance, _ = compute_covariance(
        loaded,
        texts,
        config.layer,
        positions=config.preserve_positions,
        samples=config.covariance_samples,
        cache_dir=cache_dir,
    )
    return Preservation(covariance.to(torch.float64), ridge=config.solve.ridge)


def make_delta(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    config: EditConfig,
    *,
    labels: Sequence[str] | None = None,
    preservation: Preservation | None = None,
    statistics: Statistics | None = None,
    observations: Observations | None = None,
) -> EditResult:
    """Solve a delta that teaches `facts` at `config.layer`.

    `statistics` of facts already in the parent version are added to this capture's, so the
    result is a function of the whole fact set; `preservation` is required by the preserving rule.
    `observations` of `facts` at `config.layer`, if given, are used instead of capturing again
    (a sweep over solve settings captures once).
    """
    loaded.architecture.check_layer(loaded.model, config.layer)
    started = time.perf_counter()
    if observations is None:
        observations = capture_observations(loaded, facts, config, labels=labels)
    captured = time.perf_counter()
    weight = base_weight(loaded, config.layer)
    source: Observations | Statistics = observations
    if statistics is not None:
        source = statistics + Statistics.from_observations(observations, config.layer, loaded.fingerprint)
    result = solve(weight, source, config.solve, preservation)
    solved = time.perf_counter()
    name = loaded.architecture.down_proj_name(config.layer)
    delta = Delta(
        tensors={name: loaded.architecture.to_parameter_layout(result.delta.to(torch.float32))},
        base_fingerprint=loaded.fingerprint,
        metadata={
            "layer": config.layer,
            "hparams": config.model_dump(mode="json"),
            "fact_set_digest": fact_set_digest(facts),
            "facts": len(facts),
            "positions": result.positions,
            "relative_norm": result.relative_norm,
            "condition_number": result.condition_number,
            "form": result.form,
        },
    )
    log.info(
        "solved %s (%s form) for %d facts, %d positions: |dW|/|W| = %.4g, condition %.3g",
        result.rule,
        result.form,
        len(facts),
        result.positions,
        result.relative_norm,
        result.condition_number,
    )
    return EditResult(delta, result, captured - started, solved - captured)
