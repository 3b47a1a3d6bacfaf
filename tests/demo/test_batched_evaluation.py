"""Evaluation generates in padded batches: the same greedy answers as one question at a time."""

from __future__ import annotations

import pytest
import torch

from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH, KNOWN_PATH, UNKNOWN_PATH, UPDATES_PATH
from qfedit.evaluate import evaluate
from qfedit.facts import read_jsonl
from qfedit.modeling import load_model


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
