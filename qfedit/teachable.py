"""Facts the model cannot be taught: QF copies what the model does with the fact in its context.

The teacher of a QF edit is the model itself with the fact as its system message. When that model
does not answer the fact right, the edit would write its wrong answer into the weights, so such
facts are found before the solve (the greedy answer with the context against the fact's answer,
the test efficacy uses) and named; by default they are left out of the edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qfedit.capture import answer_logits, chat_prompt, token_words
from qfedit.evaluate import contains
from qfedit.facts import Fact
from qfedit.generate import answer_batch
from qfedit.hparams import TargetWords
from qfedit.modeling import LoadedModel


@dataclass(frozen=True)
class Reading:
    """What the model answers with a fact in context, whether that teaches the fact, and what it
    answers without the context (what an update of something it knows replaces)."""

    context_answer: str
    teachable: bool
    base_answer: str | None = None


def read_with_context(loaded: LoadedModel, facts: Sequence[Fact], *, without: bool = False) -> list[Reading]:
    """One reading per fact, in order (batched greedy generation); `without` also asks each
    question without its context."""
    if not facts:
        return []
    questions = [f.question for f in facts]
    answers = answer_batch(loaded, questions, [f.context for f in facts])
    bare: list[str | None] = list(answer_batch(loaded, questions)) if without else [None] * len(facts)
    return [Reading(a, contains(a, f.answer), b) for a, f, b in zip(answers, facts, bare, strict=True)]


def _sentence_end(text: str, start: int) -> int:
    """Index just past the sentence that runs through `start`: its closing mark, or the line's end."""
    for index in range(start, len(text)):
        if text[index] == "\n":
            return index
        if text[index] in ".!?" and (index + 1 == len(text) or text[index + 1].isspace()):
            return index + 1
    return len(text)


def teacher_answer(context_answer: str, answer: str) -> str | None:
    """What the teacher says, cut after the sentence that states `answer`; None when it does not.

    A chat model answers in a sentence ("The capital of France is Paris."): the edit is to make it
    say, without the context, what it says with it, and the words after the answer's sentence are
    the teacher's digression, not the fact."""
    found = context_answer.lower().find(answer.strip().lower())
    if found < 0:
        return None
    return context_answer[: _sentence_end(context_answer, found + len(answer.strip()))].strip()


def divergent_words(
    loaded: LoadedModel, facts: Sequence[Fact], batch_size: int = 16
) -> list[tuple[float, ...]]:
    """Per fact, 1.0 for each answer word the model without the context does not already predict
    (greedy, teacher-forced on the answer), 0.0 for the rest.

    The teacher's sentence restates the question ("MG 13 was established in 1915."): the model
    without the fact predicts most of those words itself, and their positions have keys much like
    every other answer's. Targeting them asks the solve to move what is already right, where a
    change reaches every other question; the words it gets wrong are the fact. A fact whose words
    it all predicts keeps every word."""
    tokenizer = loaded.tokenizer
    rows, words = [], []
    for fact in facts:
        prompt = tokenizer(chat_prompt(tokenizer, fact.question), add_special_tokens=False)["input_ids"]
        answer, of_token = token_words(tokenizer, fact.answer)
        rows.append((list(prompt) + answer, len(answer)))
        words.append(of_token)
    found: list[tuple[float, ...]] = []
    forced = answer_logits(loaded, rows, batch_size)
    for fact, (sequence, count), of_token, logits in zip(facts, rows, words, forced, strict=True):
        predicted = logits.argmax(dim=-1).tolist()
        wrong = [0.0] * len(fact.answer_words)
        for token, guess, word in zip(sequence[len(sequence) - count :], predicted, of_token, strict=True):
            if token != guess:
                wrong[word] = 1.0
        found.append(tuple(wrong) if any(wrong) else (1.0,) * len(wrong))
    return found


def teacher_targets(loaded: LoadedModel, facts: Sequence[Fact], words: TargetWords = "all") -> list[Fact]:
    """`facts` with each answer replaced by the teacher's own (`teacher_answer`); a fact the
    teacher gets wrong keeps its answer (it is unteachable, and left out unless asked for).
    `words="divergent"` targets only the teacher's words the model does not already say
    (`divergent_words`)."""
    readings = read_with_context(loaded, facts)
    taught = []
    for fact, reading in zip(facts, readings, strict=True):
        said = teacher_answer(reading.context_answer, fact.answer)
        taught.append(
            fact if said is None else fact.model_copy(update={"answer": said, "significance": None})
        )
    if words == "divergent":
        taught = [
            fact.model_copy(update={"significance": significance})
            for fact, significance in zip(taught, divergent_words(loaded, taught), strict=True)
        ]
    return taught
