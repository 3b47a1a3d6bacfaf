"""The last step of a batch: solve its version's delta, evaluate it, publish it, move aliases.

A version's delta is a function of its whole fact set: the parent's statistics plus what the
batch adds, minus what it retracts (or, with no parent statistics, the fact set's stored
observations reduced from scratch), solved by `qfedit.edit.solve_delta`, the same function an
edit in one process ends in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qfedit.capture import check_fits
from qfedit.config import Settings
from qfedit.db.models import Batch, BatchKind, BatchStatus, FactStatus, Model, Version
from qfedit.delta import Delta
from qfedit.edit import base_weight, preservations_for, solve_delta, spread_delta
from qfedit.errors import NotFoundError, PermanentError
from qfedit.facts import FactError, StaleAnswers
from qfedit.modeling import LoadedModel
from qfedit.pipeline import captures, lifecycle
from qfedit.pipeline.evaluation import evaluate_version, passes
from qfedit.pipeline.observations import observation_runs, stored_statistics
from qfedit.pipeline.preservation import preservation_texts, stale_answers
from qfedit.pipeline.settings import ModelSettings, batch_settings
from qfedit.pipeline.steps import ModelCache
from qfedit.registry import supersede
from qfedit.registry.aliases import HEAD, PRODUCTION, get_alias, set_alias
from qfedit.registry.audit import record_audit
from qfedit.registry.base import digest_of_hashes
from qfedit.registry.batches import batch_fact_ids, get_batch
from qfedit.registry.facts import facts_of_model, load_facts, set_fact_status, to_record
from qfedit.registry.versions import record_version, version_fact_ids
from qfedit.solve import Preservation, pick_form
from qfedit.statistics import Observations, Statistics
from qfedit.store import CheckpointStore, StoredObject

log = logging.getLogger(__name__)


def _refusal_reasons(
    loaded: LoadedModel,
    session: Session,
    excluded: list[dict[str, Any]],
    settings: Settings,
    include_eos: bool,
) -> None:
    """Put the exact reason (field, size, limit) in each refused fact's entry, measured again as
    the capture measured it: cheap, since a refused fact is counted before it is tokenized."""
    refused = [e for e in excluded if e["reason"] == captures.TOO_LARGE]
    if not refused:
        return
    rows = {row.id: row for row in load_facts(session, [e["fact_id"] for e in refused[:100]])}
    for entry in refused[:100]:
        row = rows.get(entry["fact_id"])
        if row is None:
            continue
        try:
            check_fits(
                loaded, to_record(row), f"fact {row.id}", settings.fact_limits, include_eos=include_eos
            )
        except FactError as error:
            entry["reason"] = f"refused before capture: {error}"


@dataclass
class SolveOutcome:
    version: Version | None
    published: bool


@dataclass
class Plan:
    """What a batch's version is: its fact set against the parent's, and what it leaves out."""

    parent: Version | None
    batch_ids: set[int]
    fact_ids: set[int]
    added: set[int]
    removed: set[int]
    replaced: dict[int, int]
    """Older facts superseded by the batch's new ones: old id -> new id."""
    excluded: list[dict[str, Any]]
    stale: StaleAnswers
    updates: int
    """Base-model answers the new facts update (known facts it answered otherwise)."""


@dataclass
class Computed:
    delta: Delta | None
    delta_object: StoredObject | None
    stats_object: StoredObject | None
    relative: float | None
    preservation_left_out: int


def _plan(
    session: Session, batch: Batch, config: ModelSettings, loaded: LoadedModel, settings: Settings
) -> Plan:
    model, layer = batch.model, config.edit.layer
    parent = session.get(Version, batch.parent_version_id) if batch.parent_version_id is not None else None
    parent_ids = version_fact_ids(session, parent) if parent is not None else set()
    batch_ids = set(batch_fact_ids(session, batch))
    excluded: list[dict[str, Any]] = []
    replaced: dict[int, int] = {}
    if batch.kind == BatchKind.EDIT:
        added, removed = batch_ids - parent_ids, set[int]()
        # Facts refused as too large for the model have no observations: always left out.
        excluded = captures.unteachable(
            session, added, layer, model.fingerprint, refused_only=config.unteachable == "include"
        )
        _refusal_reasons(loaded, session, excluded, settings, config.edit.include_eos)
        added -= {entry["fact_id"] for entry in excluded}
        if excluded and not added:
            raise PermanentError(
                f"every fact this batch adds is unteachable (the model with the fact as its system "
                f"message does not answer it right) or too large for the model: facts "
                f"{[e['fact_id'] for e in excluded][:20]}; first: {excluded[0]['reason']}; see "
                "`qfedit batch status`, or set unteachable=include to write unteachable ones as it reads them"
            )
        # A fact this batch adds may state a new answer to a question the version answers:
        # the older fact leaves the fact set in the same version (qfedit.registry.supersede).
        replaced = supersede.superseded_by(session, added, parent_ids)
        removed = set(replaced)
        fact_ids = (parent_ids | added) - removed
    else:
        fact_ids = parent_ids - batch_ids
        added, removed = set(), batch_ids & parent_ids
    # Transcripts and evaluation facts that state a superseded answer are no longer to be kept.
    stale, updates = stale_answers(session, replaced, added, layer, model.fingerprint, config.abstention)
    return Plan(parent, batch_ids, fact_ids, added, removed, replaced, excluded, stale, updates)


def _compute(
    session: Session,
    store: CheckpointStore,
    loaded: LoadedModel,
    model: Model,
    plan: Plan,
    config: ModelSettings,
    settings: Settings,
    say: Callable[[str], None],
) -> Computed:
    """The version's delta, stored: solved from statistics (one layer) or recaptured (a spread)."""
    layer = config.edit.layer
    left_out = 0

    def preservations() -> dict[int, Preservation] | None:
        # Both solve paths preserve the same corpus, without the stale transcripts.
        nonlocal left_out
        if config.edit.solve.rule != "preserve":
            return None
        say("reading the preservation corpus")
        texts, left_out = preservation_texts(loaded, config, settings, plan.stale)
        return preservations_for(loaded, config.edit, texts, settings.cache_dir, activity=say)

    fact_ids = plan.fact_ids
    if not fact_ids:
        return Computed(None, None, None, None, 0)
    digest = digest_of_hashes(facts_of_model(session, model, fact_ids).values())
    if len(config.edit.edited_layers) > 1:
        # Spread over layers: keys of the upper layers depend on the lower layers' edits, so the
        # whole fact set is recaptured here (no statistics to add to, none stored).
        ordered = sorted(fact_ids)
        records = [to_record(row) for row in load_facts(session, ordered)]
        session.rollback()
        edit = spread_delta(
            loaded,
            records,
            config.edit,
            preservation=preservations(),
            fact_ids=ordered,
            labels=[f"fact {i}" for i in ordered],
            fact_set_digest=digest,
            shard_size=config.shard_size,
            batch_size=config.capture_batch_size,
            activity=say,
        )
        return Computed(
            edit.delta, store.put_bytes(edit.delta.to_bytes()), None, edit.solve.relative_norm, left_out
        )
    statistics = _statistics(
        session, store, loaded, model, plan.parent, layer, fact_ids, plan.added, plan.removed
    )
    observations = None
    if pick_form(config.edit.solve.form, statistics.positions, statistics.keys_gram.shape[0]) == "dual":
        runs = observation_runs(session, store, fact_ids, layer, model.fingerprint)
        observations = Observations.concatenate(list(runs))
    session.rollback()
    found = preservations()
    say(f"solving layer {layer} ({len(fact_ids)} facts, {statistics.positions} positions)")
    delta, result = solve_delta(
        loaded,
        config.edit,
        statistics,
        observations=observations,
        preservation=found[layer] if found is not None else None,
        fact_set_digest=digest,
        facts=len(fact_ids),
    )
    return Computed(
        delta,
        store.put_bytes(delta.to_bytes()),
        store.put_bytes(statistics.to_bytes()),
        result.relative_norm,
        left_out,
    )


def _metrics(
    loaded: LoadedModel,
    session: Session,
    plan: Plan,
    computed: Computed,
    config: ModelSettings,
    settings: Settings,
    model: Model,
    say: Callable[[str], None],
) -> dict[str, Any]:
    metrics, judged_left_out = evaluate_version(
        loaded,
        session,
        config,
        settings,
        plan.fact_ids,
        len(plan.added),
        computed.delta,
        plan.stale,
        fingerprint=model.fingerprint,
        activity=say,
    )
    if plan.stale:
        metrics["superseded"] = {
            "facts": len(plan.replaced),
            "base_answers": plan.updates,
            "preservation_left_out": computed.preservation_left_out,
            "evaluation_left_out": judged_left_out,
        }
    if plan.excluded:
        refused = sum(e["reason"] != captures.UNTEACHABLE for e in plan.excluded)
        metrics["excluded"] = {
            "unteachable": len(plan.excluded) - refused,
            **({"refused": refused} if refused else {}),
            "facts": [e["fact_id"] for e in plan.excluded],
        }
    return metrics


def _record(
    session: Session,
    batch_id: int,
    model: Model,
    plan: Plan,
    computed: Computed,
    metrics: dict[str, Any],
    config: ModelSettings,
) -> SolveOutcome:
    """The version, the facts' statuses and the aliases, in one transaction; nothing if another
    delivery of the task recorded the version first."""
    batch = get_batch(session, batch_id, for_update=True)
    existing = session.scalar(select(Version).where(Version.batch_id == batch_id))
    if existing is not None or batch.status != BatchStatus.EVALUATING:
        session.rollback()
        return SolveOutcome(existing, False)
    version = record_version(
        session,
        model=model,
        fact_ids=plan.fact_ids,
        created_by=batch.requested_by,
        reason=batch.reason or f"batch {batch.id}: {batch.kind.value} of {len(plan.batch_ids)} facts",
        checkpoint=computed.delta_object,
        statistics=computed.stats_object,
        layer=config.edit.layer,
        rule=config.edit.solve.rule,
        hyperparameters=config.model_dump(mode="json"),
        relative_update_norm=computed.relative,
        metrics=metrics,
        parent=plan.parent,
        batch=batch,
    )
    if plan.added:
        set_fact_status(
            session, plan.added, FactStatus.APPLIED, actor=lifecycle.SYSTEM, reason=f"batch {batch.id}"
        )
    if plan.excluded:
        # Left pending: a later base model, or a fixed fact, may teach them.
        batch.excluded_facts = plan.excluded
        record_audit(
            session,
            actor=lifecycle.SYSTEM,
            action="batch.excluded",
            object_type="batch",
            object_id=str(batch.id),
            model_id=batch.model_id,
            details={"unteachable": [e["fact_id"] for e in plan.excluded][:100], "count": len(plan.excluded)},
        )
    if plan.removed:
        reason = batch.reason or ""
        if plan.replaced:
            reason = f"superseded in batch {batch.id} by " + ", ".join(
                f"{old}→{new}" for old, new in sorted(plan.replaced.items())[:20]
            )
        set_fact_status(session, plan.removed, FactStatus.RETRACTED, actor=batch.requested_by, reason=reason)
    _move_alias(session, model, HEAD, version, f"batch {batch.id} published")
    if config.promote is not None and passes(metrics, config.promote):
        _move_alias(session, model, PRODUCTION, version, f"batch {batch.id} passed {config.promote}")
    lifecycle.transition_batch(session, batch, BatchStatus.PUBLISHED, actor=lifecycle.SYSTEM)
    lifecycle.release_line(session, batch)
    session.commit()
    log.info("batch %d published %s", batch_id, version.label)
    return SolveOutcome(version, True)


def solve_batch(
    session_maker: sessionmaker[Session],
    store: CheckpointStore,
    models: ModelCache,
    batch_id: int,
    settings: Settings,
    before_commit: Callable[[], None] | None = None,
) -> SolveOutcome:
    """Solve, store, evaluate and publish a batch whose shards are all captured: plan the fact
    set, compute the delta, evaluate it, record the version.

    `before_commit` runs after the delta is stored and before the version is recorded."""

    def say(activity: str) -> None:
        # In a transaction of its own: the solve's session holds no row lock meanwhile.
        try:
            with session_maker() as own:
                lifecycle.set_activity(own, batch_id, activity)
                own.commit()
        except SQLAlchemyError as error:  # a note is not worth the batch
            log.warning("batch %d: activity %r not recorded: %s", batch_id, activity, error)

    with session_maker() as session:
        batch = get_batch(session, batch_id)
        existing = session.scalar(select(Version).where(Version.batch_id == batch_id))
        if existing is not None or batch.status not in (BatchStatus.SOLVING, BatchStatus.EVALUATING):
            return SolveOutcome(existing, False)
        model, config = batch.model, batch_settings(batch)
        loaded = models.get(model)
        plan = _plan(session, batch, config, loaded, settings)
        computed = _compute(session, store, loaded, model, plan, config, settings, say)
        session.rollback()

        batch = get_batch(session, batch_id, for_update=True)
        lifecycle.transition_batch(session, batch, BatchStatus.EVALUATING, actor=lifecycle.SYSTEM)
        session.commit()
        metrics = _metrics(loaded, session, plan, computed, config, settings, model, say)
        if before_commit is not None:
            before_commit()
        return _record(session, batch_id, model, plan, computed, metrics, config)


def _statistics(
    session: Session,
    store: CheckpointStore,
    loaded: LoadedModel,
    model: Model,
    parent: Version | None,
    layer: int,
    fact_ids: set[int],
    added: set[int],
    removed: set[int],
) -> Statistics:
    d, m = base_weight(loaded, layer).shape

    def stored(ids: set[int]) -> Statistics:
        return stored_statistics(session, store, ids, layer=layer, fingerprint=model.fingerprint, d=d, m=m)

    if parent is None or parent.layer != layer or not (parent.statistics_path and parent.statistics_sha256):
        return stored(fact_ids)
    # The parent's sum plus what this batch adds, minus what it retracts.
    parent_stats = Statistics.from_bytes(store.read_bytes(parent.statistics_path, parent.statistics_sha256))
    return parent_stats + stored(added) - stored(removed)


def _move_alias(session: Session, model: Model, name: str, version: Version, reason: str) -> None:
    try:
        expected: int | None = get_alias(session, model, name).revision
    except NotFoundError:
        expected = None
    set_alias(
        session, name=name, version=version, reason=reason, actor=lifecycle.SYSTEM, expect_revision=expected
    )
