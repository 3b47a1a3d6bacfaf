"""Facts the model cannot be taught: QF copies what the model does with the fact in its context.

The teacher of a QF edit is the model itself with the fact as its system message. When that model
does not answer the fact right, the edit would write its wrong answer into the weights, so such
facts are found before the solve (the greedy answer with the context against the fact's answer,
the test efficacy uses) and named; by default they are left out of the edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qfedit.evaluate import contains
from qfedit.facts import Fact
from qfedit.generate import answer_batch
from qfedit.modeling import LoadedModel


@dataclass(frozen=True)
class Reading:
    """What the model answers with a fact in context, and whether that teaches the fact."""

    context_answer: str
    teachable: bool


def read_with_context(loaded: LoadedModel, facts: Sequence[Fact]) -> list[Reading]:
    """One reading per fact, in order (batched greedy generation)."""
    if not facts:
        return []
    answers = answer_batch(loaded, [f.question for f in facts], [f.context for f in facts])
    return [Reading(a, contains(a, f.answer)) for a, f in zip(answers, facts, strict=True)]
