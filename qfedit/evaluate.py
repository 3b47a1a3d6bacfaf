"""Edit quality: does the edited model answer the new facts, and does it keep everything else?

- efficacy: the greedy answer to the question, without context, contains the fact's answer;
- paraphrase: the same for each held-out phrasing;
- specificity: neighbors and known facts are answered as the unedited model answers them;
- abstention: questions about unknown entities still get the abstention;
- log-probability margin: teacher-forced log p(new answer) - log p(base model's answer), as
  CounterFact reports ("efficacy score": the fraction where the new answer is more likely).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qfedit.capture import answer_logits, chat_prompt
from qfedit.delta import Delta, applied
from qfedit.facts import Fact
from qfedit.generate import answer_batch
from qfedit.modeling import LoadedModel

ABSTENTION = "I do not know."


def contains(answer: str, expected: str) -> bool:
    return expected.strip().lower() in answer.lower()


def answer_logprobs(
    loaded: LoadedModel, questions: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[float]:
    """Teacher-forced log p(answer + end of turn | question), no context, for each pair."""
    tokenizer = loaded.tokenizer
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows: list[tuple[list[int], int]] = []
    for question, answer in zip(questions, answers, strict=True):
        prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        rows.append((list(prompt) + list(target), len(target)))
    scores: list[float] = []
    for (sequence, answer_len), logits in zip(rows, answer_logits(loaded, rows, batch_size), strict=True):
        targets = torch.tensor(sequence[len(sequence) - answer_len :], device=logits.device)
        picked = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1))
        scores.append(float(picked.sum()))
    return scores


@dataclass
class EvalReport:
    efficacy: float | None
    paraphrase: float | None
    specificity: float | None
    """Neighbors and known facts answered as the unedited model answers them."""
    abstention: float | None
    counts: dict[str, int]
    specificity_relative: float
    """Correct answers on neighbors and known facts, edited over unedited."""
    abstention_relative: float
    specificity_neighbors: float | None
    """The edited subjects' other relations, answered as before."""
    specificity_known: float | None
    """Facts of other entities, answered as before."""
    logprob_margin: float
    """Mean log p(new answer) - log p(base model's answer), teacher-forced, edited model."""
    logprob_success: float | None
    """Fraction of facts where the new answer is more likely than the base model's answer."""
    relative_norm: float | None = None
    in_context: float | None = None
    """Facts the model answers right with the fact in the system message and no delta: QF can
    only write what the model does with the context, so this is efficacy's ceiling."""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fraction(hits: Sequence[bool]) -> float | None:
    # A metric of an empty set is no metric: None, shown as "-", and never a passed threshold.
    return sum(hits) / len(hits) if hits else None


def evaluate(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    delta: Delta | None = None,
    *,
    known: Sequence[Fact] = (),
    unknown: Sequence[str] = (),
    abstention: str = ABSTENTION,
    progress: Callable[[str], None] | None = None,
    batch_size: int = 32,
    recorded_base_answers: Sequence[str | None] | None = None,
    recorded_context_answers: Sequence[str | None] | None = None,
) -> EvalReport:
    """Measure `delta` (or the model as it is, without one) on `facts`, `known` facts and `unknown`
    questions; `progress(stage)` hears each stage begin (generation over every set is minutes).
    Answers are generated `batch_size` at a time (left-padded, with a KV cache): the same answers
    as one at a time (`tests/demo/test_batched_evaluation.py`), several times faster.

    `recorded_base_answers` and `recorded_context_answers`, one per fact or None, are what the
    unedited model was already seen to answer to a fact's question without and with its context
    (a queue's capture records both): those are not generated again."""
    stage = progress or (lambda _: None)
    questions = [f.question for f in facts]
    paraphrases = [(i, p) for i, f in enumerate(facts) for p in f.paraphrases]
    keep = [(n.question, n.answer) for f in facts for n in f.neighbors] + [
        (k.question, k.answer) for k in known
    ]

    def unless_given(given: Sequence[str | None] | None, contexts: bool) -> list[str]:
        answers: list[str | None] = list(given) if given is not None else [None] * len(facts)
        if len(answers) != len(facts):
            raise ValueError(f"{len(answers)} recorded answers for {len(facts)} facts")
        todo = [i for i, answer in enumerate(answers) if answer is None]
        found = answer_batch(
            loaded,
            [questions[i] for i in todo],
            [facts[i].context for i in todo] if contexts else None,
            batch_size=batch_size,
        )
        for i, answer in zip(todo, found, strict=True):
            answers[i] = answer
        filled = [answer for answer in answers if answer is not None]
        assert len(filled) == len(facts)
        return filled

    stage(f"base model on {len(keep) + len(unknown) + len(questions)} questions")
    base_keep = answer_batch(loaded, [q for q, _ in keep], batch_size=batch_size)
    base_unknown = answer_batch(loaded, list(unknown), batch_size=batch_size)
    base_answers = unless_given(recorded_base_answers, contexts=False)
    stage(f"base model reading {len(questions)} facts from context")
    read_answers = unless_given(recorded_context_answers, contexts=True)
    with applied(loaded, delta):
        stage(f"edited model on {len(questions) + len(paraphrases) + len(keep) + len(unknown)} questions")
        edited = answer_batch(
            loaded,
            questions + [p for _, p in paraphrases] + [q for q, _ in keep] + list(unknown),
            batch_size=batch_size,
        )
        stage("answer log-probabilities")
        new_logp = answer_logprobs(loaded, questions, [f.answer for f in facts], batch_size=batch_size)
        old_logp = answer_logprobs(loaded, questions, base_answers, batch_size=batch_size)
    edited_facts = edited[: len(facts)]
    edited_para = edited[len(facts) : len(facts) + len(paraphrases)]
    edited_keep = edited[len(facts) + len(paraphrases) : len(facts) + len(paraphrases) + len(keep)]
    edited_unknown = edited[len(facts) + len(paraphrases) + len(keep) :]

    efficacy = [contains(a, f.answer) for a, f in zip(edited_facts, facts, strict=True)]
    paraphrase = [contains(a, facts[i].answer) for a, (i, _) in zip(edited_para, paraphrases, strict=True)]
    same = [a == b for a, b in zip(edited_keep, base_keep, strict=True)]
    n_neighbors = len(keep) - len(known)
    right_after = sum(contains(a, exp) for a, (_, exp) in zip(edited_keep, keep, strict=True))
    right_before = sum(contains(a, exp) for a, (_, exp) in zip(base_keep, keep, strict=True))
    abstain_after = [contains(a, abstention) for a in edited_unknown]
    abstain_before = sum(contains(a, abstention) for a in base_unknown)
    margins = [
        n - o
        for n, o, a, f in zip(new_logp, old_logp, base_answers, facts, strict=True)
        if not contains(a, f.answer)
    ]
    relative = None
    if delta is not None and "relative_norm" in delta.metadata:
        relative = float(delta.metadata["relative_norm"])
    return EvalReport(
        efficacy=_fraction(efficacy),
        paraphrase=_fraction(paraphrase),
        specificity=_fraction(same),
        abstention=_fraction(abstain_after),
        counts={
            "facts": len(facts),
            "paraphrases": len(paraphrases),
            "specificity": len(keep),
            "abstention": len(unknown),
        },
        specificity_relative=right_after / right_before if right_before else 1.0,
        abstention_relative=sum(abstain_after) / abstain_before if abstain_before else 1.0,
        logprob_margin=sum(margins) / len(margins) if margins else 0.0,
        logprob_success=_fraction([m > 0 for m in margins]),
        relative_norm=relative,
        specificity_neighbors=_fraction(same[:n_neighbors]),
        specificity_known=_fraction(same[n_neighbors:]),
        in_context=_fraction([contains(a, f.answer) for a, f in zip(read_answers, facts, strict=True)]),
        details={
            "answers": [
                {"question": f.question, "expected": f.answer, "before": b, "with_context": c, "after": a}
                for f, b, c, a in zip(facts, base_answers, read_answers, edited_facts, strict=True)
            ],
        },
    )
