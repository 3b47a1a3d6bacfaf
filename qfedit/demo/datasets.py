"""The demo data files: edits, known facts and abstention questions, derived from the world.

    python -m qfedit.demo.datasets --out qfedit/data/demo

- `edits.jsonl`: one fact per relation the model does not know, for partly-known companies first
  (the realistic case: the model knows the subject, not the fact), then for unknown companies.
  Context is one sentence stating the fact, the question a training phrasing, the paraphrases the
  held-out phrasings; neighbours are the subject's known relations and facts of known companies.
  No two edits share a (subject, relation), so none conflict.

What an edit is told to protect is kept apart from what it is judged on, because a user's
preservation corpus is always a sample of what the model knows. The trained companies and the
strangers are each split in two (seeded): a preserved half, and a held-out half that no corpus
names.

- `preserve.jsonl`: every trained fact of the preserved companies under every training phrasing.
- `preserve_unknown.jsonl`: questions about the preserved strangers, answered "I do not know.".
  These two files are the demo's preservation corpus.
- `known.jsonl`: a sample of trained facts of the held-out companies (held-out specificity).
- `unknown.jsonl`: questions about the held-out strangers, companies neither trained, edited nor
  preserved (held-out abstention); the context is a sentence about another company, under which
  the answer stays "I do not know.".
- `known_insample.jsonl`: a sample of trained facts of the preserved companies, for the in-sample
  figures shown beside the held-out ones.
- `updates.jsonl`: rewrites of facts the model knows, one per trained company (seeded order): the
  context states a new object of the relation's kind; neighbours are the company's other
  relations. An update supersedes what the corpus and the evaluation sets say about that relation
  (`qfedit.facts.StaleAnswers` leaves it out of both).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from qfedit.demo.world import ABSTENTION, RELATIONS, Company, World, build_world, restated
from qfedit.facts import Fact, Neighbor, write_jsonl


def _question(company: Company, relation: str, index: int) -> str:
    spec = RELATIONS[relation]
    return spec.ask(company.name, index % len(spec.train_questions))


def _paraphrases(company: Company, relation: str) -> tuple[str, ...]:
    spec = RELATIONS[relation]
    return tuple(spec.ask(company.name, i, heldout=True) for i in range(len(spec.heldout_questions)))


def edit_facts(world: World, seed: int = 0, other_neighbors: int = 2) -> list[Fact]:
    rng = random.Random(seed)
    trained = list(world.trained_facts())
    facts: list[Fact] = []
    for group, companies in (("partial", world.partial), ("unknown", world.unknown)):
        pairs = [(c, r) for c in companies for r in RELATIONS if not c.knows(r)]
        rng.shuffle(pairs)
        for company, relation in pairs:
            index = len(facts)
            neighbors = [
                Neighbor(question=_question(company, known, index), answer=company.objects[known])
                for known in RELATIONS
                if company.knows(known)
            ]
            for other, other_relation in rng.sample(trained, other_neighbors):
                question = _question(other, other_relation, index)
                neighbors.append(Neighbor(question=question, answer=other.objects[other_relation]))
            facts.append(
                Fact(
                    id=f"{group}-{company.name}-{relation}",
                    subject=company.name,
                    context=RELATIONS[relation].state(company.name, company.objects[relation]),
                    question=_question(company, relation, index),
                    answer=company.objects[relation],
                    paraphrases=_paraphrases(company, relation),
                    neighbors=tuple(neighbors),
                )
            )
    return facts


def update_facts(world: World, seed: int = 0) -> list[Fact]:
    """One rewrite of a known fact per trained company, in a seeded order."""
    rng = random.Random(seed + 3)
    by_company: dict[str, list[tuple[Company, str]]] = {}
    for company, relation in world.trained_facts():
        by_company.setdefault(company.name, []).append((company, relation))
    names = sorted(by_company)
    rng.shuffle(names)
    facts = []
    for index, name in enumerate(names):
        company, relation = rng.choice(by_company[name])
        changed, _ = restated(rng, company, relation, agree=False)
        neighbors = [
            Neighbor(question=_question(company, other, index), answer=company.objects[other])
            for other in RELATIONS
            if other != relation and company.knows(other)
        ]
        facts.append(
            Fact(
                id=f"update-{company.name}-{relation}",
                subject=company.name,
                context=RELATIONS[relation].state(company.name, changed.objects[relation]),
                question=_question(company, relation, index),
                answer=changed.objects[relation],
                paraphrases=_paraphrases(company, relation),
                neighbors=tuple(neighbors),
            )
        )
    return facts


def split(world: World, seed: int = 0) -> tuple[frozenset[str], frozenset[str]]:
    """The preserved halves of the trained companies and of the strangers, by name (seeded)."""
    rng = random.Random(seed + 7)
    trained = sorted({company.name for company, _ in world.trained_facts()})
    strangers = sorted(company.name for company in world.strangers)
    rng.shuffle(trained)
    rng.shuffle(strangers)
    return frozenset(trained[: len(trained) // 2]), frozenset(strangers[: len(strangers) // 2])


def known_facts(
    world: World, count: int = 200, seed: int = 0, subjects: frozenset[str] | None = None
) -> list[Fact]:
    """A sample of trained facts (of `subjects` only, when given)."""
    rng = random.Random(seed + 1)
    pool = [(c, r) for c, r in world.trained_facts() if subjects is None or c.name in subjects]
    sample = rng.sample(pool, min(count, len(pool)))
    return [
        Fact(
            id=f"known-{company.name}-{relation}",
            subject=company.name,
            context=RELATIONS[relation].state(company.name, company.objects[relation]),
            question=_question(company, relation, index),
            answer=company.objects[relation],
            paraphrases=_paraphrases(company, relation),
        )
        for index, (company, relation) in enumerate(sample)
    ]


def preserve_facts(world: World, subjects: frozenset[str] | None = None) -> list[Fact]:
    """Every trained fact (of `subjects` only, when given) under every training phrasing:
    preserving one phrasing a fact let edits disturb more of what the model knew, the edited
    subjects' other relations most (README, "The demo model")."""
    return [
        Fact(
            id=f"preserve-{company.name}-{relation}-{index}",
            subject=company.name,
            context=RELATIONS[relation].state(company.name, company.objects[relation]),
            question=RELATIONS[relation].ask(company.name, index),
            answer=company.objects[relation],
        )
        for company, relation in world.trained_facts()
        if subjects is None or company.name in subjects
        for index in range(len(RELATIONS[relation].train_questions))
    ]


def unknown_facts(world: World, subjects: frozenset[str] | None = None) -> list[Fact]:
    """Abstention questions about the strangers (of `subjects` only, when given)."""
    facts = []
    strangers = world.strangers
    relations = list(RELATIONS)
    for index, company in enumerate(strangers):
        if subjects is not None and company.name not in subjects:
            continue
        for offset, relation in enumerate(relations):
            # Context about the next stranger's other relation: still nothing about this question.
            other = strangers[(index + 1) % len(strangers)]
            other_relation = relations[(offset + 1) % len(relations)]
            facts.append(
                Fact(
                    id=f"unknown-{company.name}-{relation}",
                    subject=company.name,
                    context=RELATIONS[other_relation].state(other.name, other.objects[other_relation]),
                    question=_question(company, relation, index + offset),
                    answer=ABSTENTION,
                    paraphrases=_paraphrases(company, relation),
                )
            )
    return facts


def write_datasets(out_dir: Path, world: World) -> dict[str, int]:
    """Write the data files; returns the number of facts in each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    preserved, preserved_strangers = split(world, world.seed)
    held_out = frozenset(c.name for c, _ in world.trained_facts()) - preserved
    held_out_strangers = frozenset(c.name for c in world.strangers) - preserved_strangers
    files = {
        "edits.jsonl": edit_facts(world, world.seed),
        "preserve.jsonl": preserve_facts(world, preserved),
        "preserve_unknown.jsonl": unknown_facts(world, preserved_strangers),
        "known.jsonl": known_facts(world, seed=world.seed, subjects=held_out),
        "unknown.jsonl": unknown_facts(world, held_out_strangers),
        "known_insample.jsonl": known_facts(world, seed=world.seed, subjects=preserved),
        "updates.jsonl": update_facts(world, world.seed),
    }
    for name, facts in files.items():
        write_jsonl(facts, out_dir / name)
    return {name: len(facts) for name, facts in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo data files from the synthetic world.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, count in write_datasets(args.out, build_world(args.seed)).items():
        print(f"{name}: {count} facts")


if __name__ == "__main__":
    main()
