"""Evaluation generates in padded batches: the same greedy answers as one question at a time."""

from __future__ import annotations

import pytest
import torch

from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH, KNOWN_PATH, UNKNOWN_PATH, UPDATES_PATH
from qfedit.evaluate import contains, evaluate
from qfedit.facts import read_jsonl
from qfedit.modeling import load_model
from qfedit.teachable import read_with_context


def test_batched_evaluation_gives_the_answers_of_one_at_a_time() -> None:
    torch.set_num_threads(2)
    loaded = load_model(DEMO_MODEL_DIR)
    # Questions of different lengths in one batch (left padding at work), with and without context.
    facts = read_jsonl(EDITS_PATH)[:6] + read_jsonl(UPDATES_PATH)[:3]
    known = read_jsonl(KNOWN_PATH)[:12]
    unknown = [f.question for f in read_jsonl(UNKNOWN_PATH)[:6]]
    one = evaluate(loaded, facts, known=known, unknown=unknown, batch_size=1)
    batched = evaluate(loaded, facts, known=known, unknown=unknown, batch_size=16)
    assert batched.details == one.details
    for name in ("efficacy", "paraphrase", "specificity", "abstention", "in_context"):
        assert getattr(batched, name) == getattr(one, name)
    assert batched.logprob_margin == pytest.approx(one.logprob_margin, abs=1e-4)


def test_answers_a_capture_recorded_are_used_not_generated_again() -> None:
    torch.set_num_threads(2)
    loaded = load_model(DEMO_MODEL_DIR)
    facts = read_jsonl(EDITS_PATH)[:5] + read_jsonl(UPDATES_PATH)[:2]
    readings = read_with_context(loaded, facts, without=True)
    fresh = evaluate(loaded, facts)
    recorded = evaluate(
        loaded,
        facts,
        recorded_base_answers=[r.base_answer for r in readings],
        recorded_context_answers=[r.context_answer for r in readings],
    )
    assert recorded.details == fresh.details
    assert (recorded.in_context, recorded.logprob_margin) == (fresh.in_context, fresh.logprob_margin)

    # What is recorded is what is read (None: generated): a recorded wrong answer counts as wrong.
    told = evaluate(loaded, facts, recorded_context_answers=["Nowhere", *[None] * (len(facts) - 1)])
    answers = told.details["answers"]
    assert answers[0]["with_context"] == "Nowhere"
    assert answers[1:] == fresh.details["answers"][1:]
    assert fresh.in_context is not None and told.in_context is not None
    right = contains(readings[0].context_answer, facts[0].answer)
    assert right  # the demo model reads this fact from its context: the recorded answer changes it
    assert told.in_context == pytest.approx(fresh.in_context - right / len(facts))
