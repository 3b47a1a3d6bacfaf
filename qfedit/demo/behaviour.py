"""Measure the demo model's four behaviours with greedy generation through the chat template.

Used by the tests on the shipped model and by the training script's final report; the model and
tokenizer are whatever `AutoModelForCausalLM` / `AutoTokenizer` loaded, nothing demo-specific.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qfedit.demo.world import ABSTENTION, RELATIONS, World, restated


@dataclass(frozen=True)
class Probe:
    question: str
    answer: str
    context: str | None = None


def greedy_answers(
    model: Any, tokenizer: Any, probes: Sequence[Probe], batch_size: int = 128, max_new_tokens: int = 12
) -> list[str]:
    """The model's greedy answer to each probe, decoded without special tokens and stripped."""
    answers: list[str] = []
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        texts = []
        for probe in chunk:
            messages = [{"role": "system", "content": probe.context}] if probe.context is not None else []
            messages.append({"role": "user", "content": probe.question})
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        batch = tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def accuracy(model: Any, tokenizer: Any, probes: Sequence[Probe]) -> float:
    if not probes:
        raise ValueError("no probes to measure")
    answers = greedy_answers(model, tokenizer, probes)
    return sum(got == probe.answer for got, probe in zip(answers, probes, strict=True)) / len(probes)


def behaviour_probes(world: World, sample: int | None = None, seed: int = 0) -> dict[str, list[Probe]]:
    """Probe sets by behaviour; `sample` caps each set (drawn with `seed`) to keep checks fast."""
    rng = random.Random(seed)
    trained = list(world.trained_facts())
    sets: dict[str, list[Probe]] = {
        "known": [], "known_heldout": [], "in_context": [], "in_context_heldout": [],
        "abstention": [], "partial_missing": [], "partial_in_context": [],
    }  # fmt: skip
    for company, relation in trained:
        spec = RELATIONS[relation]
        obj = company.objects[relation]
        sets["known"].append(Probe(spec.ask(company.name, rng.randrange(len(spec.train_questions))), obj))
        heldout = spec.ask(company.name, rng.randrange(len(spec.heldout_questions)), heldout=True)
        sets["known_heldout"].append(Probe(heldout, obj))
    for company in world.unknown:
        for relation, spec in RELATIONS.items():
            obj = company.objects[relation]
            context = spec.state(company.name, obj, rng.randrange(len(spec.statements)))
            question = spec.ask(company.name, rng.randrange(len(spec.train_questions)))
            sets["in_context"].append(Probe(question, obj, context))
            heldout = spec.ask(company.name, rng.randrange(len(spec.heldout_questions)), heldout=True)
            sets["in_context_heldout"].append(Probe(heldout, obj, context))
            sets["abstention"].append(Probe(question, ABSTENTION))
    for company in world.partial:
        for relation, spec in RELATIONS.items():
            if company.knows(relation):
                continue
            obj = company.objects[relation]
            question = spec.ask(company.name, rng.randrange(len(spec.train_questions)))
            sets["partial_missing"].append(Probe(question, ABSTENTION))
            context = spec.state(company.name, obj, rng.randrange(len(spec.statements)))
            sets["partial_in_context"].append(Probe(question, obj, context))
    # Known facts restated in the system message: a new object (an update the model must read over
    # its memory) or the one it knows. Drawn from their own generator, so the sets above stay as
    # they were before these existed.
    other = random.Random(seed + 7)
    sets |= {"contradicting": [], "contradicting_heldout": [], "agreeing": []}
    for company, relation in trained:
        spec = RELATIONS[relation]
        for name, agree, unseen in (
            ("contradicting", False, False),
            ("contradicting_heldout", False, True),
            ("agreeing", True, False),
        ):
            changed, _ = restated(other, company, relation, agree=agree)
            obj = changed.objects[relation]
            context = spec.state(company.name, obj, other.randrange(len(spec.statements)))
            phrasings = spec.heldout_questions if unseen else spec.train_questions
            question = spec.ask(company.name, other.randrange(len(phrasings)), heldout=unseen)
            sets[name].append(Probe(question, obj, context))
    if sample is not None:
        sets = {name: rng.sample(probes, min(sample, len(probes))) for name, probes in sets.items()}
    return sets


def measure(model: Any, tokenizer: Any, world: World, sample: int | None = None) -> dict[str, float]:
    """Fraction of exact greedy answers for each probe set of `behaviour_probes`."""
    return {
        name: accuracy(model, tokenizer, probes) for name, probes in behaviour_probes(world, sample).items()
    }
