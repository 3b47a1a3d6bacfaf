"""The one way an edit is made: capture observations, reduce them to statistics, solve a delta.

    edit = make_delta(loaded, facts, EditConfig(layer=4), preservation=preservation)
    edit.delta.save(path)

`make_delta` is the whole edit in one process (the CLI, the benchmarks, the tests). The queue runs
the same steps as tasks: each capture task calls `capture_observations` on one shard, and the
solve task reduces the stored observations with `Statistics.accumulate(fact_runs(...))` and calls
`solve_delta`. Captured in the same shards and reduced in the same runs, the same facts and
settings give bitwise the same delta on either path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qfedit.capture import CaptureOptions, capture
from qfedit.covariance import CorpusText, compute_covariance, corpus_digest
from qfedit.delta import Delta
from qfedit.errors import InvalidInputError
from qfedit.facts import Fact, fact_set_digest
from qfedit.hparams import EditConfig
from qfedit.modeling import LoadedModel
from qfedit.solve import Preservation, SolveResult, pick_form, solve
from qfedit.statistics import Observations, Statistics, fact_runs

log = logging.getLogger(__name__)

# Facts captured together, and sequences per forward pass. Capture pads and batches sequences by
# length within a shard, so these decide the float rounding of a capture: the queue's defaults
# (`ModelSettings.shard_size`, `capture_batch_size`) are these too.
CAPTURE_SHARD = 64
CAPTURE_BATCH = 16


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
    fact_ids: Sequence[int] | None = None,
    shard_size: int = CAPTURE_SHARD,
    batch_size: int = CAPTURE_BATCH,
) -> Observations:
    """Observations of `facts` at `config.layer`, captured `shard_size` facts at a time so that a
    large batch's activations are never all held at once; rows name `fact_ids` (default: the
    facts' indexes)."""
    ids = list(fact_ids) if fact_ids is not None else list(range(len(facts)))
    if len(ids) != len(facts):
        raise InvalidInputError(f"{len(ids)} fact ids for {len(facts)} facts")
    weight = base_weight(loaded, config.layer)
    options = CaptureOptions(batch_size=batch_size, include_eos=config.include_eos)
    names = list(labels) if labels is not None else [f.id or f"fact {i + 1}" for i, f in enumerate(facts)]
    parts: list[Observations] = []
    for start in range(0, len(facts), shard_size):
        captured = capture(
            loaded,
            facts[start : start + shard_size],
            config.layer,
            labels=names[start : start + shard_size],
            options=options,
        )
        part = Observations.from_capture(captured, weight)
        assert part.facts is not None
        shard_ids = torch.tensor(ids[start : start + shard_size], dtype=torch.int64)
        parts.append(Observations(part.keys, part.errors, part.weights, shard_ids[part.facts]))
    return Observations.concatenate(parts)


def preservation_for(
    loaded: LoadedModel, config: EditConfig, texts: Sequence[CorpusText], cache_dir: Path | None = None
) -> Preservation:
    """The preservation covariance of `texts` at the edit's layer (cached in `cache_dir`)."""
    covariance, _ = compute_covariance(
        loaded,
        texts,
        config.layer,
        positions=config.preserve_positions,
        samples=config.covariance_samples,
        cache_dir=cache_dir,
    )
    return Preservation(
        covariance.to(torch.float64),
        ridge=config.solve.ridge,
        corpus_digest=corpus_digest(texts, config.preserve_positions),
    )


def solve_delta(
    loaded: LoadedModel,
    config: EditConfig,
    statistics: Statistics,
    *,
    observations: Observations | None = None,
    preservation: Preservation | None = None,
    fact_set_digest: str,
    facts: int,
) -> tuple[Delta, SolveResult]:
    """The delta of a fact set from its statistics (and, for the dual form, its observations).

    Its metadata says exactly what made it: layer, edit settings, form, corpus and fact-set
    digests, and the solve's norms."""
    loaded.architecture.check_layer(loaded.model, config.layer)
    weight = base_weight(loaded, config.layer)
    m = weight.shape[1]
    form = pick_form(config.solve.form, statistics.positions, m)
    if form == "dual" and observations is None:
        raise InvalidInputError("the dual form needs the fact set's observations, not only its statistics")
    source: Observations | Statistics = observations if form == "dual" and observations else statistics
    result = solve(weight, source, config.solve.model_copy(update={"form": form}), preservation)
    name = loaded.architecture.down_proj_name(config.layer)
    delta = Delta(
        tensors={name: loaded.architecture.to_parameter_layout(result.delta.to(torch.float32))},
        base_fingerprint=loaded.fingerprint,
        metadata={
            "layer": config.layer,
            "hparams": config.model_dump(mode="json"),
            "form": result.form,
            "corpus_digest": preservation.corpus_digest if preservation is not None else None,
            "fact_set_digest": fact_set_digest,
            "facts": facts,
            "positions": result.positions,
            "relative_norm": result.relative_norm,
            "condition_number": result.condition_number,
        },
    )
    log.info(
        "solved %s (%s form) for %d facts, %d positions: |dW|/|W| = %.4g, condition %.3g",
        result.rule,
        result.form,
        facts,
        result.positions,
        result.relative_norm,
        result.condition_number,
    )
    return delta, result


def make_delta(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    config: EditConfig,
    *,
    labels: Sequence[str] | None = None,
    preservation: Preservation | None = None,
    observations: Observations | None = None,
) -> EditResult:
    """Capture `facts`, reduce and solve: a delta that teaches them at `config.layer`.

    `observations` of `facts` (from `capture_observations`), if given, are used instead of
    capturing again: a sweep over solve settings captures once."""
    loaded.architecture.check_layer(loaded.model, config.layer)
    started = time.perf_counter()
    if observations is None:
        observations = capture_observations(loaded, facts, config, labels=labels)
    captured = time.perf_counter()
    d, m = base_weight(loaded, config.layer).shape
    runs = list(fact_runs(observations, list(range(len(facts)))))
    statistics = Statistics.accumulate(runs, d=d, m=m, layer=config.layer, fingerprint=loaded.fingerprint)
    delta, result = solve_delta(
        loaded,
        config,
        statistics,
        observations=Observations.concatenate(runs),
        preservation=preservation,
        fact_set_digest=fact_set_digest(facts),
        facts=len(facts),
    )
    return EditResult(delta, result, captured - started, time.perf_counter() - captured)
