"""`evaluate` reports how many facts the model reads from context: efficacy's ceiling for QF."""

from __future__ import annotations

import pytest
import torch

from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH
from qfedit.evaluate import contains, evaluate
from qfedit.facts import Fact, read_jsonl
from qfedit.generate import answer_batch
from qfedit.modeling import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.set_num_threads(2)
    return load_model(DEMO_MODEL_DIR)


def _answers_that_depend_on_context(loaded: LoadedModel) -> list[tuple[Fact, str, str]]:
    """Bundled facts whose greedy answer with the context differs from the one without it."""
    facts = read_jsonl(EDITS_PATH)[:60]
    questions = [f.question for f in facts]
    with_context = answer_batch(loaded, questions, [f.context for f in facts])
    without = answer_batch(loaded, questions)
    found = [
        (fact, read, closed)
        for fact, read, closed in zip(facts, with_context, without, strict=True)
        if read.strip() and closed.strip() and not contains(closed, read) and not contains(read, closed)
    ]
    assert len(found) >= 3, "the demo model should answer some facts differently with their context"
    return found[:3]


def test_in_context_counts_answers_read_from_the_system_message(loaded: LoadedModel) -> None:
    picked = _answers_that_depend_on_context(loaded)
    # The answer the model gives when it reads the context: read right, and not known without it.
    read = [fact.model_copy(update={"answer": answer}) for fact, answer, _ in picked]
    report = evaluate(loaded, read)
    assert report.in_context == 1.0
    assert report.efficacy == 0.0
    # The answer it gives without the context: right closed-book, not what it reads with it.
    closed = [fact.model_copy(update={"answer": answer}) for fact, _, answer in picked]
    report = evaluate(loaded, closed)
    assert report.in_context == 0.0
    assert report.efficacy == 1.0
    assert [row["with_context"] for row in report.details["answers"]] == [a for _, a, _ in picked]
