"""The flattened CounterFact/zsRE layout (EasyEdit, KnowEdit) and the teacher's target sentence."""

from __future__ import annotations

import pytest

from qfedit.facts import FactError
from qfedit.importing.convert import to_fact
from qfedit.importing.records import Format
from qfedit.teachable import teacher_answer

FLAT_COUNTERFACT = {
    "case_id": 3,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux, a native",
    "locality_prompt": "The mother tongue of Léon Blum is",
    "locality_ground_truth": "French",
}


def test_flattened_counterfact_becomes_a_fact_with_its_locality_as_a_neighbour() -> None:
    fact = to_fact(FLAT_COUNTERFACT, Format.COUNTERFACT, "cf.json record 1")
    assert fact.question == "The mother tongue of Danielle Darrieux is"
    assert fact.answer == "English"
    assert fact.context == "The mother tongue of Danielle Darrieux is English."
    assert fact.paraphrases == ("Danielle Darrieux, a native",)
    assert [(n.question, n.answer) for n in fact.neighbors] == [
        ("The mother tongue of Léon Blum is", "French")
    ]
    assert fact.id == "3" and fact.subject == "Danielle Darrieux"


def test_flattened_zsre_states_its_question_and_reads_nq_locality() -> None:
    record = {
        "prompt": "Which university did Anselm Coyle attend?",
        "target_new": "Marrow Institute",
        "ground_truth": ["Eastbrook College"],
        "rephrase_prompt": "Where did Anselm Coyle study?",
        "locality_prompt": "nq question: how many legs does a spider have",
        "locality_ground_truth": ["eight"],
        "subject": "Anselm Coyle",
    }
    fact = to_fact(record, Format.ZSRE, "zsre.json record 1")
    assert fact.context == "Q: Which university did Anselm Coyle attend?\nA: Marrow Institute"
    assert [(n.question, n.answer) for n in fact.neighbors] == [
        ("How many legs does a spider have?", "eight")
    ]


def test_a_flattened_record_with_half_a_locality_pair_is_refused_naming_the_field() -> None:
    record = {k: v for k, v in FLAT_COUNTERFACT.items() if k != "locality_ground_truth"}
    with pytest.raises(FactError) as refused:
        to_fact(record, Format.COUNTERFACT, "cf.json record 1")
    assert refused.value.field == "locality_ground_truth"


@pytest.mark.parametrize(
    ("said", "answer", "expected"),
    [
        ("The capital of France is Paris. It is also", "Paris", "The capital of France is Paris."),
        ("MG 13: 1915. The rest", "1915", "MG 13: 1915."),
        (
            "Dorothy Page, Angelica's mother, was born in 1901",
            "Dorothy Page",
            "Dorothy Page, Angelica's mother, was born in 1901",
        ),
        ("It is marrow institute!\nMore", "Marrow Institute", "It is marrow institute!"),
        ("I do not know.", "Paris", None),
        # A decimal point is not a sentence's end.
        ("The value is 3.5 metres. Next", "3.5", "The value is 3.5 metres."),
    ],
)
def test_the_teacher_target_is_cut_after_the_sentence_that_states_the_answer(
    said: str, answer: str, expected: str | None
) -> None:
    assert teacher_answer(said, answer) == expected
