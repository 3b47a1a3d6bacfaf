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

import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from qfedit.capture import Capture, CaptureOptions, capture, capture_side
from qfedit.covariance import CorpusText, compute_covariances, corpus_digest
from qfedit.delta import Delta, applied
from qfedit.errors import InvalidInputError
from qfedit.facts import Fact, fact_set_digest
from qfedit.hparams import CAPTURE_BATCH, CAPTURE_SHARD, EditConfig
from qfedit.modeling import LoadedModel
from qfedit.solve import Preservation, SolveResult, pick_form, solve
from qfedit.span import project, rivals, settled
from qfedit.statistics import STATISTICS_RUN, Observations, Statistics, as_stored, fact_runs
from qfedit.teachable import taught_rows

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        groups = _taught(loaded, facts[start : start + shard_size], config)
        captured = capture(
            loaded,
            [row for group in groups for row in group],
            config.layer,
            labels=_per_row(names[start : start + shard_size], groups),
            options=options,
        )
        part = Observations.from_capture(captured, weight)
        if config.target_span or config.target_margin is not None:
            part = Observations(
                part.keys,
                as_stored(_target_errors(loaded, captured, weight, config)),
                part.weights,
                part.facts,
            )
        assert part.facts is not None
        shard_ids = torch.tensor(_per_row(ids[start : start + shard_size], groups), dtype=torch.int64)
        parts.append(Observations(part.keys, part.errors, part.weights, shard_ids[part.facts]))
    return Observations.concatenate(parts)


def _taught(loaded: LoadedModel, facts: Sequence[Fact], config: EditConfig) -> list[list[Fact]]:
    """Per fact, the rows its edit teacher-forces (`qfedit.teachable.taught_rows`)."""
    return taught_rows(
        loaded,
        facts,
        teacher=config.target == "teacher",
        words=config.target_words,
        phrasings=config.phrasings,
    )


def _per_row(values: Sequence[T], groups: Sequence[Sequence[Fact]]) -> list[T]:
    """`values`, one per fact, repeated for each of the fact's rows (its phrasings share its id
    and name)."""
    return [value for value, group in zip(values, groups, strict=True) for _ in group]


def _target_errors(
    loaded: LoadedModel, captured: Capture, weight: torch.Tensor, config: EditConfig
) -> torch.Tensor:
    """A single layer's errors with `target_span` (the gap between its outputs with and without
    the context, projected on the logit gaps of each position's rivals: `qfedit.span`) and
    `target_margin` (none where the model without the context already says the taught token)."""
    assert captured.tokens is not None
    with_context, without = captured.block_outputs(weight)
    gains = with_context - without
    if config.target_span:
        gains = project(
            loaded, gains, captured.tokens, rivals(loaded, with_context, without, config.target_span)
        )
    if config.target_margin is not None:
        gains[settled(loaded, without, captured.tokens, config.target_margin)] = 0.0
    return captured.errors_for(weight, gains)


def _solve_layer(
    loaded: LoadedModel,
    config: EditConfig,
    statistics: Statistics,
    observations: Observations | None,
    preservation: Preservation | None,
) -> SolveResult:
    """`dW` of `config.layer` (d x m, float64) from the statistics, in the form they call for."""
    loaded.architecture.check_layer(loaded.model, config.layer)
    weight = base_weight(loaded, config.layer)
    m = weight.shape[1]
    form = pick_form(config.solve.form, statistics.positions, m)
    if form == "dual" and observations is None:
        raise InvalidInputError("the dual form needs the fact set's observations, not only its statistics")
    source: Observations | Statistics = observations if form == "dual" and observations else statistics
    return solve(weight, source, config.solve.model_copy(update={"form": form}), preservation)


def _parameter(loaded: LoadedModel, layer: int, change: torch.Tensor) -> tuple[str, torch.Tensor]:
    return loaded.architecture.down_proj_name(layer), loaded.architecture.to_parameter_layout(
        change.to(torch.float32)
    )


def preservations_for(
    loaded: LoadedModel,
    config: EditConfig,
    texts: Sequence[CorpusText],
    cache_dir: Path | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    activity: Callable[[str], None] | None = None,
) -> dict[int, Preservation]:
    """The preservation covariance of `texts` at each layer the edit changes (cached in
    `cache_dir`), all read in the same forward passes; `progress(layer, positions seen, positions
    wanted)` hears them grow, `activity` hears the stage begin."""
    layers = config.edited_layers
    if activity is not None:
        named = ", ".join(map(str, layers))
        activity(f"preservation covariance at layer{'s' if len(layers) > 1 else ''} {named}")
    found = compute_covariances(
        loaded,
        texts,
        layers,
        positions=config.preserve_positions,
        samples=config.covariance_samples,
        cache_dir=cache_dir,
        progress=progress,
    )
    digest = corpus_digest(texts, config.preserve_positions)
    return {
        layer: Preservation(covariance.to(torch.float64), ridge=config.solve.ridge, corpus_digest=digest)
        for layer, (covariance, _) in found.items()
    }


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
    """The delta of a fact set at one layer from its statistics (and, for the dual form, its
    observations).

    Its metadata says exactly what made it: layer, edit settings, form, corpus and fact-set
    digests, and the solve's norms."""
    if len(config.edited_layers) > 1:
        raise InvalidInputError("an edit of several layers is solved by spread_delta, not from statistics")
    result = _solve_layer(loaded, config, statistics, observations, preservation)
    name, tensor = _parameter(loaded, config.layer, result.delta)
    delta = Delta(
        tensors={name: tensor},
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


def _spread_layer(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    config: EditConfig,
    top: int,
    shards: Sequence[Sequence[slice]],
    targets: Sequence[Sequence[Path]],
    *,
    share: int,
    ids: Sequence[int],
    names: Sequence[str],
    options: CaptureOptions,
) -> tuple[Statistics, Observations | None]:
    """One spread layer's statistics, reduced run by run as the runs are captured; the
    observations too while the dual form may still need them (fewer positions than keys)."""
    layer = config.layer
    top_weight, weight = base_weight(loaded, top), base_weight(loaded, layer)
    norm = loaded.architecture.output_norm(loaded.model, layer)
    d, m = weight.shape
    statistics = Statistics.zeros(d, m, layer, loaded.fingerprint)
    kept: list[Observations] | None = [] if config.solve.form != "primal" else None
    for run, run_targets in zip(shards, targets, strict=True):
        parts = []
        for cut, path in zip(run, run_targets, strict=True):
            side = capture_side(
                loaded,
                facts[cut],
                top,
                context=False,
                key_layer=layer if layer != top else None,
                labels=names[cut],
                options=options,
            )
            keys = side.low_keys if side.low_keys is not None else side.keys
            stored = load_file(path)
            current = side.outputs(top_weight)
            errors = (stored["target"] - current) / share
            if config.target_span:
                errors = project(loaded, errors, stored["tokens"], stored["rivals"])
            if norm is not None:
                # This layer's block output should move by its share of the top layer's error:
                # the `down_proj` output whose normalised value is the current one plus the share.
                outputs = keys.to(torch.float64) @ weight.T  # (n, d) W y at this layer
                errors = norm.preimage(norm(outputs) + errors, like=outputs) - outputs
            if config.target_margin is not None:
                # Settled as the model now stands, the lower layers' edits in: left as they are.
                errors[settled(loaded, current, stored["tokens"], config.target_margin)] = 0.0
            shard_ids = torch.tensor(ids[cut], dtype=torch.int64)
            parts.append(
                Observations(as_stored(keys), as_stored(errors), side.weights, shard_ids[side.fact_index])
            )
        run_ids = list(dict.fromkeys(ids[run[0].start : run[-1].stop]))  # a fact's rows share its id
        (observations,) = fact_runs(Observations.concatenate(parts), run_ids, run=len(run_ids))
        statistics = statistics + Statistics.from_observations(observations, layer, loaded.fingerprint)
        if kept is not None:
            kept.append(observations)
            if config.solve.form == "auto" and statistics.positions >= m:
                kept = None  # the primal form then: no need to hold what grows with the fact set
    return statistics, Observations.concatenate(kept) if kept else None


def spread_delta(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    config: EditConfig,
    *,
    preservation: Mapping[int, Preservation] | None = None,
    labels: Sequence[str] | None = None,
    fact_ids: Sequence[int] | None = None,
    fact_set_digest: str,
    shard_size: int = CAPTURE_SHARD,
    batch_size: int = CAPTURE_BATCH,
    activity: Callable[[str], None] | None = None,
) -> EditResult:
    """An edit spread over `config.edited_layers`, lowest first (MEMIT's schedule, QF's target);
    `activity` hears each stage begin.

    The target is the top layer's output with the context, captured once on the base model. Each
    layer in turn, with the lower layers' edits applied, recaptures its own keys and the top
    layer's output without the context, and is solved for `1 / (layers left)` of the remaining
    error; the top layer closes what is left. Where layers normalise their MLP's output, a layer's
    share is what its block output should gain, and it is solved for the `down_proj` output whose
    normalised value gains it (`OutputNorm.preimage`). Keys then depend on the lower edits, so this is
    recaptured from the fact set each time: the version is still a pure function of (base, fact
    set, settings), but not a sum of stored statistics. `fact_ids` order the statistics' runs as
    `fact_runs` does (default: the facts' indexes)."""
    layers = config.edited_layers
    top = layers[-1]
    for layer in layers:
        loaded.architecture.check_layer(loaded.model, layer)
    if not facts:
        raise InvalidInputError("no facts to edit")
    ids = list(fact_ids) if fact_ids is not None else list(range(len(facts)))
    if len(ids) != len(facts):
        raise InvalidInputError(f"{len(ids)} fact ids for {len(facts)} facts")
    names = list(labels) if labels is not None else [f.id or f"fact {i + 1}" for i, f in enumerate(facts)]
    options = CaptureOptions(batch_size=batch_size, include_eos=config.include_eos)
    # What is taught, read on the base model shard by shard as `capture_observations` does; from
    # here on a fact's rows (its phrasings) carry its id and name.
    groups = [
        group
        for start in range(0, len(facts), shard_size)
        for group in _taught(loaded, facts[start : start + shard_size], config)
    ]
    edited = len(facts)
    facts = [row for group in groups for row in group]
    ids, names = _per_row(ids, groups), _per_row(names, groups)
    ends = list(itertools.accumulate((len(group) for group in groups), initial=0))
    # Shards never cross a statistics run, so each run is reduced as soon as its shards are in and
    # memory holds one run's observations, not the fact set's (`_spread_layer`); both are counted
    # in facts, whatever number of rows each has.
    shards = [
        [
            slice(ends[start], ends[min(start + shard_size, run + STATISTICS_RUN, edited)])
            for start in range(run, min(run + STATISTICS_RUN, edited), shard_size)
        ]
        for run in range(0, edited, STATISTICS_RUN)
    ]
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    results: list[SolveResult] = []
    with tempfile.TemporaryDirectory(prefix="qfedit-spread-") as spill:
        started = time.perf_counter()
        if activity is not None:
            activity(f"capturing the target at layer {top}, {edited} facts with their context")
        targets = _spread_targets(
            loaded, facts, top, shards, Path(spill), names=names, options=options, span=config.target_span
        )
        capture_seconds, solve_seconds = time.perf_counter() - started, 0.0
        for done, layer in enumerate(layers):
            if activity is not None:
                activity(f"solving layer {layer} ({done + 1} of {len(layers)})")
            started = time.perf_counter()
            lower = Delta(dict(tensors), loaded.fingerprint) if tensors else None
            with applied(loaded, lower):
                statistics, observations = _spread_layer(
                    loaded,
                    facts,
                    config.at_layer(layer),
                    top,
                    shards,
                    targets,
                    share=len(layers) - done,
                    ids=ids,
                    names=names,
                    options=options,
                )
            captured = time.perf_counter()
            result = _solve_layer(
                loaded, config.at_layer(layer), statistics, observations, (preservation or {}).get(layer)
            )
            name, tensor = _parameter(loaded, layer, result.delta)
            tensors[name] = tensor
            results.append(result)
            per_layer[str(layer)] = {
                "share": 1 / (len(layers) - done),
                "relative_norm": result.relative_norm,
                "condition_number": result.condition_number,
            }
            capture_seconds += captured - started
            solve_seconds += time.perf_counter() - captured
            log.info(
                "layer %d: |dW|/|W| = %.4g, condition %.3g",
                layer,
                result.relative_norm,
                result.condition_number,
            )
    combined = _combined(loaded, layers, results)
    corpus = (preservation or {}).get(top)
    delta = Delta(
        tensors=tensors,
        base_fingerprint=loaded.fingerprint,
        metadata={
            "layer": top,
            "layers": list(layers),
            "hparams": config.model_dump(mode="json"),
            "form": combined.form,
            "corpus_digest": corpus.corpus_digest if corpus is not None else None,
            "fact_set_digest": fact_set_digest,
            "facts": edited,
            "positions": combined.positions,
            "relative_norm": combined.relative_norm,
            "condition_number": combined.condition_number,
            "per_layer": per_layer,
        },
    )
    return EditResult(delta, combined, capture_seconds, solve_seconds)


def _spread_targets(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    top: int,
    shards: Sequence[Sequence[slice]],
    spill: Path,
    *,
    names: Sequence[str],
    options: CaptureOptions,
    span: int = 0,
) -> list[list[Path]]:
    """The top layer's output with the context, captured once on the base model: the targets
    (positions x d) grow with the fact set, so they wait on disk, a shard a file, with the token
    each position predicts. With `span`, each position's rival tokens too (`qfedit.span.rivals`,
    read from the base model's top layer with and without the context)."""
    top_weight = base_weight(loaded, top)
    targets: list[list[Path]] = []
    for r, run in enumerate(shards):
        targets.append([])
        for s, cut in enumerate(run):
            side = capture_side(loaded, facts[cut], top, context=True, labels=names[cut], options=options)
            outputs = side.outputs(top_weight)
            tensors = {"target": outputs.contiguous(), "tokens": side.tokens.contiguous()}
            if span:
                bare = capture_side(
                    loaded, facts[cut], top, context=False, labels=names[cut], options=options
                )
                tensors["rivals"] = rivals(loaded, outputs, bare.outputs(top_weight), span).contiguous()
            path = spill / f"target-{r}-{s}.safetensors"
            save_file(tensors, path)
            targets[-1].append(path)
    return targets


def _combined(loaded: LoadedModel, layers: Sequence[int], results: Sequence[SolveResult]) -> SolveResult:
    """One result for the spread: the worst condition, and `|dW|/|W|` over all edited weights."""
    weights = sum(float(base_weight(loaded, layer).norm() ** 2) for layer in layers)
    changes = sum(float(r.delta.norm() ** 2) for r in results)
    last = results[-1]
    return SolveResult(
        delta=last.delta,
        rule=last.rule,
        form=last.form,
        condition_number=max(r.condition_number for r in results),
        relative_norm=(changes / weights) ** 0.5 if weights else float("inf"),
        positions=last.positions,
    )


def make_delta(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    config: EditConfig,
    *,
    labels: Sequence[str] | None = None,
    preservation: Preservation | Mapping[int, Preservation] | None = None,
    observations: Observations | None = None,
) -> EditResult:
    """Capture `facts`, reduce and solve: a delta that teaches them at `config.layer` (or spread
    over `config.layers`, by `spread_delta`).

    `observations` of `facts` (from `capture_observations`), if given, are used instead of
    capturing again: a sweep over solve settings captures once (one layer only)."""
    if len(config.edited_layers) > 1:
        if isinstance(preservation, Preservation):
            raise InvalidInputError("an edit of several layers needs a preservation covariance per layer")
        if observations is not None:
            raise InvalidInputError(
                "a spread recaptures per layer: observations of one layer cannot serve it"
            )
        return spread_delta(
            loaded,
            facts,
            config,
            preservation=preservation,
            labels=labels,
            fact_set_digest=fact_set_digest(facts),
        )
    if isinstance(preservation, Mapping):
        preservation = preservation.get(config.layer)
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
