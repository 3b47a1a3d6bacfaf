"""The last step of a batch: solve its version's delta, evaluate it, publish it, move aliases.

A version's delta is a function of its whole fact set: the parent's statistics plus what the
batch adds, minus what it retracts (or, with no parent statistics, the fact set's stored
observations reduced from scratch), solved by `qfedit.edit.solve_delta`, the same function an
edit in one process ends in.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qfedit.capture import check_fits
from qfedit.config import Settings
from qfedit.covariance import CorpusText
from qfedit.db.models import BatchKind, BatchStatus, FactStatus, Model, Version
from qfedit.delta import Delta
from qfedit.edit import base_weight, preservations_for, solve_delta, spread_delta
from qfedit.errors import NotFoundError, PermanentError
from qfedit.evaluate import contains
from qfedit.facts import FactError, StaleAnswers
from qfedit.modeling import LoadedModel
from qfedit.pipeline import captures, corpora, lifecycle
from qfedit.pipeline.observations import observation_runs, stored_statistics
from qfedit.pipeline.settings import ModelSettings, batch_settings
from qfedit.pipeline.steps import ModelCache
from qfedit.registry import supersede
from qfedit.registry.aliases import get_alias, set_alias
from qfedit.registry.audit import record_audit
from qfedit.registry.base import digest_of_hashes
from qfedit.registry.batches import batch_fact_ids, get_batch
from qfedit.registry.facts import facts_of_model, load_facts, set_fact_status, to_record
from qfedit.registry.versions import record_version, version_fact_ids
from qfedit.solve import Preservation, pick_form
from qfedit.statistics import Observations, Statistics
from qfedit.store import CheckpointStore, StoredObject

log = logging.getLogger(__name__)

HEAD = "head"
PRODUCTION = "production"


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


def solve_batch(
    session_maker: sessionmaker[Session],
    store: CheckpointStore,
    models: ModelCache,
    batch_id: int,
    settings: Settings,
    before_commit: Callable[[], None] | None = None,
) -> SolveOutcome:
    """Solve, store, evaluate and publish a batch whose shards are all captured.

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
        model = batch.model
        config = batch_settings(batch)
        layer = config.edit.layer
        parent = (
            session.get(Version, batch.parent_version_id) if batch.parent_version_id is not None else None
        )
        parent_ids = version_fact_ids(session, parent) if parent is not None else set()
        batch_ids = set(batch_fact_ids(session, batch))
        excluded: list[dict[str, Any]] = []
        replaced: dict[int, int] = {}
        if batch.kind == BatchKind.EDIT:
            added, removed = batch_ids - parent_ids, set()
            # Facts refused as too large for the model have no observations: always left out.
            excluded = captures.unteachable(
                session, added, layer, model.fingerprint, refused_only=config.unteachable == "include"
            )
            _refusal_reasons(models.get(model), session, excluded, settings, config.edit.include_eos)
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
        stale, updates = _stale(session, replaced, added, layer, model.fingerprint, config.abstention)
        loaded = models.get(model)
        left_out = 0

        def preservations() -> dict[int, Preservation] | None:
            # Both solve paths preserve the same corpus, without the stale transcripts.
            nonlocal left_out
            if config.edit.solve.rule != "preserve":
                return None
            say("reading the preservation corpus")
            texts, left_out = preservation_texts(loaded, config, settings, stale)
            return preservations_for(loaded, config.edit, texts, settings.cache_dir, activity=say)

        delta_object: StoredObject | None = None
        stats_object: StoredObject | None = None
        relative: float | None = None
        delta: Delta | None = None
        if fact_ids and len(config.edit.edited_layers) > 1:
            # Spread over layers: keys of the upper layers depend on the lower layers' edits, so the
            # whole fact set is recaptured here (no statistics to add to, none stored).
            ordered = sorted(fact_ids)
            digest = digest_of_hashes(facts_of_model(session, model, fact_ids).values())
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
            delta, relative = edit.delta, edit.solve.relative_norm
            delta_object = store.put_bytes(delta.to_bytes())
        elif fact_ids:
            statistics = _statistics(session, store, loaded, model, parent, layer, fact_ids, added, removed)
            observations = None
            if (
                pick_form(config.edit.solve.form, statistics.positions, statistics.keys_gram.shape[0])
                == "dual"
            ):
                runs = observation_runs(session, store, fact_ids, layer, model.fingerprint)
                observations = Observations.concatenate(list(runs))
            digest = digest_of_hashes(facts_of_model(session, model, fact_ids).values())
            session.rollback()
            found = preservations()
            preservation = found[layer] if found is not None else None
            say(f"solving layer {layer} ({len(fact_ids)} facts, {statistics.positions} positions)")
            delta, result = solve_delta(
                loaded,
                config.edit,
                statistics,
                observations=observations,
                preservation=preservation,
                fact_set_digest=digest,
                facts=len(fact_ids),
            )
            relative = result.relative_norm
            delta_object = store.put_bytes(delta.to_bytes())
            stats_object = store.put_bytes(statistics.to_bytes())
        session.rollback()

        batch = get_batch(session, batch_id, for_update=True)
        lifecycle.transition_batch(session, batch, BatchStatus.EVALUATING, actor=lifecycle.SYSTEM)
        session.commit()

        metrics, judged_left_out = _evaluate(
            loaded,
            session,
            config,
            settings,
            fact_ids,
            len(added),
            delta,
            stale,
            fingerprint=model.fingerprint,
            activity=say,
        )
        if stale:
            metrics["superseded"] = {
                "facts": len(replaced),
                "base_answers": updates,
                "preservation_left_out": left_out,
                "evaluation_left_out": judged_left_out,
            }
        if excluded:
            refused = sum(e["reason"] != captures.UNTEACHABLE for e in excluded)
            metrics["excluded"] = {
                "unteachable": len(excluded) - refused,
                **({"refused": refused} if refused else {}),
                "facts": [e["fact_id"] for e in excluded],
            }
        if before_commit is not None:
            before_commit()

        batch = get_batch(session, batch_id, for_update=True)
        existing = session.scalar(select(Version).where(Version.batch_id == batch_id))
        if existing is not None or batch.status != BatchStatus.EVALUATING:
            session.rollback()
            return SolveOutcome(existing, False)
        version = record_version(
            session,
            model=model,
            fact_ids=fact_ids,
            created_by=batch.requested_by,
            reason=batch.reason or f"batch {batch.id}: {batch.kind.value} of {len(batch_ids)} facts",
            checkpoint=delta_object,
            statistics=stats_object,
            layer=layer,
            rule=config.edit.solve.rule,
            hyperparameters=config.model_dump(mode="json"),
            relative_update_norm=relative,
            metrics=metrics,
            parent=parent,
            batch=batch,
        )
        if added:
            set_fact_status(
                session, added, FactStatus.APPLIED, actor=lifecycle.SYSTEM, reason=f"batch {batch.id}"
            )
        if excluded:
            # Left pending: a later base model, or a fixed fact, may teach them.
            batch.excluded_facts = excluded
            record_audit(
                session,
                actor=lifecycle.SYSTEM,
                action="batch.excluded",
                object_type="batch",
                object_id=str(batch.id),
                model_id=batch.model_id,
                details={"unteachable": [e["fact_id"] for e in excluded][:100], "count": len(excluded)},
            )
        if removed:
            reason = batch.reason or ""
            if replaced:
                reason = f"superseded in batch {batch.id} by " + ", ".join(
                    f"{old}→{new}" for old, new in sorted(replaced.items())[:20]
                )
            set_fact_status(session, removed, FactStatus.RETRACTED, actor=batch.requested_by, reason=reason)
        _move_alias(session, model, HEAD, version, f"batch {batch.id} published")
        if config.promote is not None and _passes(metrics, config.promote):
            _move_alias(session, model, PRODUCTION, version, f"batch {batch.id} passed {config.promote}")
        lifecycle.transition_batch(session, batch, BatchStatus.PUBLISHED, actor=lifecycle.SYSTEM)
        lifecycle.release_line(session, batch)
        session.commit()
        log.info("batch %d published %s", batch_id, version.label)
        return SolveOutcome(version, True)


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


def preservation_texts(
    loaded: LoadedModel, config: ModelSettings, settings: Settings, stale: StaleAnswers | None = None
) -> tuple[list[CorpusText], int]:
    """The model's preservation corpus (read inside the corpus roots) without the transcripts that
    state a stale answer, and how many those were."""
    corpus = config.corpus()
    if not corpus:
        raise PermanentError(
            "the preserving rule needs a preservation corpus or known facts in the model's settings"
        )
    setting = "preservation_corpus" if config.preservation_corpus else "known_facts"
    dropped = 0

    def leave_out(question: str, answer: str) -> bool:
        nonlocal dropped
        stated = stale is not None and stale(question, answer)
        dropped += stated
        return stated

    return corpora.read_texts(loaded, corpus, setting, settings, leave_out=leave_out), dropped


def build_preservations(
    loaded: LoadedModel,
    config: ModelSettings,
    settings: Settings,
    stale: StaleAnswers | None = None,
) -> dict[int, Preservation]:
    """The preservation covariance of the model's corpus at each edited layer (cached)."""
    texts, _ = preservation_texts(loaded, config, settings, stale)
    return preservations_for(loaded, config.edit, texts, settings.cache_dir)


def _stale(
    session: Session, replaced: dict[int, int], added: set[int], layer: int, fingerprint: str, abstention: str
) -> tuple[StaleAnswers, int]:
    """What the version's new facts replace: the facts they supersede, and what the base model
    answered to their questions where it knew something else (an update of its own knowledge).
    Transcripts and evaluation facts stating those answers are no longer to be kept."""
    old = [to_record(row) for row in load_facts(session, replaced)]
    known = captures.base_answers(session, added, layer, fingerprint)
    updates = 0
    for row in load_facts(session, known):
        said = known[row.id]
        if said.strip() and not contains(said, row.answer) and not contains(said, abstention):
            old.append(to_record(row).model_copy(update={"answer": said}))
            updates += 1
    return StaleAnswers.of(old), updates


def _evaluate(
    loaded: LoadedModel,
    session: Session,
    config: ModelSettings,
    settings: Settings,
    fact_ids: set[int],
    added: int,
    delta: Delta | None,
    stale: StaleAnswers | None = None,
    *,
    fingerprint: str,
    activity: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], int]:
    """Metrics of the version: its whole fact set (or a seeded sample of it), never the batch's new
    facts alone, so a retraction is measured on what remains; and how many known facts were left
    out of specificity for stating a `stale` answer. What the base model answered to each fact
    with and without its context was recorded by the capture (`fingerprint`'s base weights) and is
    not generated again: a third of the evaluation of a batch's facts."""
    from qfedit.evaluate import evaluate

    ids = sorted(fact_ids)
    if config.eval_sample is not None and len(ids) > config.eval_sample:
        # Seeded by the fact set, so a retried or re-run batch measures the same facts.
        ids = sorted(random.Random(",".join(map(str, ids))).sample(ids, config.eval_sample))
    rows = load_facts(session, ids)
    recorded = {c.fact_id: c for c in captures.find_captures(session, ids, config.edit.layer, fingerprint)}
    session.rollback()
    known = corpora.read_facts(config.known_facts, "known_facts", settings)[: config.known_sample]
    kept = [fact for fact in known if not (stale and stale(fact.question, fact.answer))]
    left_out, known = len(known) - len(kept), kept
    unknown_facts = corpora.read_facts(config.unknown_questions, "unknown_questions", settings)
    unknown = [f.question for f in unknown_facts]
    if not rows and not known and not unknown:
        return {}, left_out
    report = evaluate(
        loaded,
        [to_record(row) for row in rows],
        delta,
        known=known,
        unknown=unknown,
        abstention=config.abstention,
        recorded_base_answers=[c.base_answer if (c := recorded.get(r.id)) else None for r in rows],
        recorded_context_answers=[c.context_answer if (c := recorded.get(r.id)) else None for r in rows],
        progress=(lambda stage: activity(f"evaluating: {stage}")) if activity is not None else None,
    )
    payload = report.to_json()
    payload.pop("details", None)
    payload["counts"]["edited"] = added
    # Whether specificity and abstention were judged on what the edit was told to protect.
    payload["protocol"] = corpora.overlap(config.corpus(), known, unknown_facts, settings)
    if not payload["protocol"]["held_out"]:
        log.warning(
            "metrics are in-sample: the preservation corpus names evaluation facts %s", payload["protocol"]
        )
    return payload, left_out


def _passes(metrics: dict[str, Any], thresholds: dict[str, float]) -> bool:
    return all(isinstance(metrics.get(k), int | float) and metrics[k] >= v for k, v in thresholds.items())


def _move_alias(session: Session, model: Model, name: str, version: Version, reason: str) -> None:
    try:
        expected: int | None = get_alias(session, model, name).revision
    except NotFoundError:
        expected = None
    set_alias(
        session, name=name, version=version, reason=reason, actor=lifecycle.SYSTEM, expect_revision=expected
    )
