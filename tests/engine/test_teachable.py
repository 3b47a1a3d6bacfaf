"""The teacher's target: which of its words an edit aims at (`target_words`), and the model's own
phrasings of a fact's question taught beside it (`phrasings`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FACTS

from qfedit import teachable
from qfedit.demo import DEMO_MODEL_DIR
from qfedit.edit import make_delta
from qfedit.facts import Fact
from qfedit.hparams import EditConfig
from qfedit.modeling import load_model
from qfedit.teachable import divergent_words, phrasings_in, read_with_context


def test_divergent_words_are_the_ones_the_model_without_the_fact_does_not_say() -> None:
    # The demo model knows Sexiro's founder (Pavel Orsini) closed-book.
    loaded = load_model(DEMO_MODEL_DIR)
    question, context = "Who started Sexiro?", "The founder of Sexiro is Pavel Zorn."
    known = Fact(question=question, answer="Pavel Orsini", context=context)
    changed = Fact(question=question, answer="Pavel Zorn", context=context)
    renamed = Fact(question=question, answer="Mira Orsini", context=context)
    said, first_changed, last_changed = divergent_words(loaded, [known, changed, renamed])
    # All of it is said already: nothing to aim at, so every word is kept (not none).
    assert said == (1.0, 1.0)
    assert first_changed == (0.0, 1.0)  # "Pavel" it says; "Zorn" is the fact
    # A changed first word: the rest is teacher-forced after it, and "Orsini" follows "Mira"
    # only if the model carries the name over; whichever it does, "Mira" is aimed at.
    assert last_changed[0] == 1.0


def test_phrasings_are_new_questions_that_do_not_give_the_answer_away() -> None:
    fact = Fact(question="Who started Sexiro?", answer="Pavel Zorn", context="Sexiro: Pavel Zorn.")
    replies = [
        "Who founded Sexiro?\nQuestion: Who wrote Dracula?",  # the first line only
        "who started sexiro",  # not a question, and the fact's own
        "Who started Sexiro ?",  # the fact's own question, by its words
        "Was Sexiro started by Pavel Zorn?",  # gives the answer away
        "Who founded  Sexiro?",  # the first again
        "Sexiro was started by whom?",
        "Sexiro.",
    ]
    assert phrasings_in(fact, replies) == ["Who founded Sexiro?", "Sexiro was started by whom?"]


@pytest.mark.parametrize("layers", [None, [1, 2]], ids=["one-layer", "spread"])
def test_a_facts_phrasings_are_taught_as_its_own_rows(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, layers: list[int] | None
) -> None:
    # With the fact's answer as the target, each phrasing is the fact asked another way: the
    # edit equals one of the same rows imported as facts of their own, but counts the facts.
    loaded = load_model(tiny_model_dirs["qwen2"])
    worded = {f.question: [f"so {f.question}"] for f in FACTS}
    # As the model's would: none asked for, none written (the edit of the rows as facts asks none).
    monkeypatch.setattr(
        teachable,
        "rephrasings",
        lambda _loaded, facts, count: [worded[f.question][:count] if count else [] for f in facts],
    )
    config = EditConfig.model_validate({"layer": 2, "layers": layers, "solve": {"rule": "seed"}})
    rows = [row for f in FACTS for row in (f, f.model_copy(update={"question": worded[f.question][0]}))]
    phrased = make_delta(loaded, FACTS, config.model_copy(update={"phrasings": 1}))
    as_facts = make_delta(loaded, rows, config)
    alone = make_delta(loaded, FACTS, config)
    for name, tensor in as_facts.delta.tensors.items():
        assert torch.equal(phrased.delta.tensors[name], tensor), name
        assert not torch.equal(alone.delta.tensors[name], tensor), name
    assert phrased.solve.positions == as_facts.solve.positions > alone.solve.positions
    if layers:
        assert phrased.delta.metadata["facts"] == len(FACTS)


def test_a_phrasing_the_teacher_does_not_answer_right_is_not_taught(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(DEMO_MODEL_DIR)
    context = "The company Laimousex was founded in 1954."
    fact = Fact(question="When was Laimousex founded?", answer="1954", context=context)
    asked = ["When was Laimousex established?", "Who started Sexiro?"]
    monkeypatch.setattr(teachable, "rephrasings", lambda _loaded, facts, count: [asked for _ in facts])
    said = [
        r.context_answer
        for r in read_with_context(loaded, [fact.model_copy(update={"question": q}) for q in asked])
    ]
    assert "1954" in said[0] and "1954" not in said[1], said  # the premise
    ((head, *phrased),) = teachable.taught_rows(loaded, [fact], teacher=True, words="all", phrasings=2)
    assert head.question == fact.question and "1954" in head.answer
    assert [row.question for row in phrased] == ["When was Laimousex established?"]
    assert phrased[0].answer == teachable.teacher_answer(said[0], "1954")
