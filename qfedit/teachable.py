"""Facts the model cannot be taught: QF copies what the model does with the fact in its context.

The teacher of a QF edit is the model itself with the fact as its system message. When that model
does not answer the fact right, the edit would write its wrong answer into the weights, so such
facts are found before the solve (the greedy answer with the context against the fact's answer,
the test efficacy uses) and named; by default they are left out of the edit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from qfedit.capture import answer_logits, chat_prompt, token_words
from qfedit.evaluate import contains
from qfedit.facts import Fact
from qfedit.generate import answer_batch, generate_prompts
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


REPHRASINGS = (
    (
        ("Where was Marie Curie born?", "In which city was Marie Curie born?"),
        ("Who wrote the novel Dracula?", "Which author wrote Dracula?"),
        ("What year did the Berlin Wall fall?", "When did the Berlin Wall come down?"),
    ),
    (
        ("Which company makes the iPhone?", "What company manufactures the iPhone?"),
        ("What language is spoken in Brazil?", "Brazil's people speak which language?"),
        ("Who directed the film Jaws?", "The film Jaws was directed by whom?"),
    ),
    (
        ("What river flows through Vienna?", "Vienna lies on which river?"),
        ("Who is the father of Prince William?", "Prince William's father is who?"),
        ("Which sport does Serena Williams play?", "What sport is Serena Williams known for playing?"),
    ),
    (
        ("What is the capital of Kenya?", "Kenya's capital city is which city?"),
        ("When was the Eiffel Tower built?", "In what year was the Eiffel Tower constructed?"),
        ("Who founded Microsoft?", "Microsoft was founded by whom?"),
    ),
)
"""Examples of a question worded another way, one set per phrasing asked for. A small chat model
asked in its chat to reword a question answers it instead; continuing a page of examples, it
rewords (and a base model without a chat template does it too)."""


def _rephrase_prompt(shots: Sequence[tuple[str, str]], question: str) -> str:
    page = "".join(f"Question: {a}\nThe same question, worded differently: {b}\n\n" for a, b in shots)
    return page + f"Question: {question}\nThe same question, worded differently:"


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w ]", " ", text.lower()).split())


def rephrasings(loaded: LoadedModel, facts: Sequence[Fact], count: int) -> list[list[str]]:
    """Up to `count` phrasings of each fact's question, written by the model itself (greedy, one
    per set of `REPHRASINGS` examples, batched): each a question, distinct from the fact's and
    from each other, and none that states the fact's answer. More questions to teach the edit
    on, so that it holds for more than the one phrasing imported; held-out paraphrases stay held
    out, the model never sees them."""
    if count <= 0 or not facts:
        return [[] for _ in facts]
    sets = REPHRASINGS[: min(count, len(REPHRASINGS))]
    prompts = [_rephrase_prompt(shots, fact.question) for fact in facts for shots in sets]
    replies = generate_prompts(loaded, prompts, max_new_tokens=32)
    return [
        phrasings_in(fact, [reply.text for reply in replies[index * len(sets) : (index + 1) * len(sets)]])
        for index, fact in enumerate(facts)
    ]


def phrasings_in(fact: Fact, replies: Sequence[str]) -> list[str]:
    """The phrasings of `fact`'s question in the model's `replies` (each's first line): questions
    only, none that is the fact's own question or an earlier one again (by their words), or that
    gives the answer away."""
    seen, found = {_plain(fact.question)}, []
    for reply in replies:
        question = reply.strip().split("\n", 1)[0].strip()
        if not question.endswith("?") or len(_plain(question)) < 8:
            continue
        if fact.answer.strip().lower() in question.lower() or _plain(question) in seen:
            continue
        seen.add(_plain(question))
        found.append(question)
    return found


def taught_rows(
    loaded: LoadedModel, facts: Sequence[Fact], *, teacher: bool, words: TargetWords, phrasings: int
) -> list[list[Fact]]:
    """Per fact, what the edit teacher-forces: the fact, then up to `phrasings` of the model's own
    phrasings of its question (`rephrasings`). With `teacher`, each row's answer is the teacher's
    own (`teacher_answer`), read for every row in one batch: a fact the teacher gets wrong keeps
    its answer (it is unteachable, and left out unless asked for), a phrasing it gets wrong is
    dropped (its row would teach something else); `words="divergent"` then targets only the
    teacher's words the model does not already say (`divergent_words`)."""
    asked = rephrasings(loaded, facts, phrasings)
    groups = [
        [fact, *(fact.model_copy(update={"question": q}) for q in questions)]
        for fact, questions in zip(facts, asked, strict=True)
    ]
    if not teacher:
        return groups
    readings = iter(read_with_context(loaded, [row for group in groups for row in group]))
    taught: list[list[Fact]] = []
    for group in groups:
        rows = []
        for index, row in enumerate(group):
            said = teacher_answer(next(readings).context_answer, row.answer)
            if said is not None:
                rows.append(row.model_copy(update={"answer": said, "significance": None}))
            elif index == 0:
                rows.append(row)
        taught.append(rows)
    if words == "divergent":
        significance = iter(divergent_words(loaded, [row for group in taught for row in group]))
        taught = [
            [row.model_copy(update={"significance": next(significance)}) for row in group] for group in taught
        ]
    return taught
