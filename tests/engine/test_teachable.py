"""The teacher's target: which of its words an edit aims at (`target_words`)."""

from __future__ import annotations

from qfedit.demo import DEMO_MODEL_DIR
from qfedit.facts import Fact
from qfedit.modeling import load_model
from qfedit.teachable import divergent_words


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
