"""A version's metrics: its fact set (or a seeded sample) against the model's known facts and
unknown questions, held out from what the edit preserved where the settings allow it."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from qfedit.config import Settings
from qfedit.delta import Delta
from qfedit.facts import StaleAnswers
from qfedit.modeling import LoadedModel
from qfedit.pipeline import captures, corpora
from qfedit.pipeline.settings import ModelSettings
from qfedit.registry.facts import load_facts, to_record

log = logging.getLogger(__name__)


def evaluate_version(
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


def passes(metrics: dict[str, Any], thresholds: dict[str, float]) -> bool:
    return all(isinstance(metrics.get(k), int | float) and metrics[k] >= v for k, v in thresholds.items())
