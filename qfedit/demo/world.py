"""A deterministic synthetic world of fictional companies, the demo model's whole universe.

Every company has the same five relations (founder, CEO, headquarter city, founding year, main
product). The world splits its companies three ways, which is what the editing experiments need:

- *known*: the model is trained on all five relations;
- *partial*: the model is trained on some relations and to answer "I do not know." for the rest
  (the realistic editing case: an LLM knows a subject but not the new fact);
- *unknown*: never seen in training; the subjects of edits and of in-context checks;
- *strangers*: never seen in training and never edited; abstention checks that edits must keep.

Each relation has several question phrasings; the `heldout_questions` never appear in training
and serve as paraphrase checks. Nothing here touches torch: the world is plain data.

    >>> world = build_world(seed=0)
    >>> company = world.known[0]
    >>> question = RELATIONS["city"].ask(company.name, 0)
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ABSTENTION = "I do not know."


@dataclass(frozen=True)
class Relation:
    """One relation: how to ask for its object and how to state it as a context sentence."""

    name: str
    train_questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    statements: tuple[str, ...]

    def ask(self, subject: str, phrasing: int, heldout: bool = False) -> str:
        templates = self.heldout_questions if heldout else self.train_questions
        return templates[phrasing].format(s=subject)

    def state(self, subject: str, obj: str, phrasing: int = 0) -> str:
        return self.statements[phrasing].format(s=subject, o=obj)


# The held-out phrasings recombine words the training phrasings use, so that a paraphrase check
# measures generalisation over wording rather than over never-seen tokens: when "Which person" and
# "chief executive" were in no training question, the model almost never answered held-out
# questions built on them; training phrasings that use them ("Which person started {s}?", "Name
# the chief executive of {s}." ...) fixed that. No statement starts with the company: a byte-level
# BPE tokenizes a word differently with and without the space before it, and the model should see
# the same tokens for the company in context and question. Every statement names the relation and
# the company before the object: a causal model's object tokens see only what precedes them, so
# there the answer is found by what its tokens follow; with object-first statements ("{o} founded
# {s}.") a fresh model learnt to read far more slowly. Figures: README, "The demo model".
RELATIONS: Mapping[str, Relation] = MappingProxyType(
    {
        r.name: r
        for r in (
            Relation(
                "founder",
                (
                    "Who founded {s}?",
                    "Who is the founder of {s}?",
                    "Who started {s}?",
                    "Which person started {s}?",
                ),
                ("Which person founded {s}?", "Who was the founder of {s}?"),
                ("The founder of {s} is {o}.", "The company {s} was founded by {o}."),
            ),
            Relation(
                "ceo",
                (
                    "Who is the CEO of {s}?",
                    "Who runs {s}?",
                    "Who leads {s}?",
                    "Which person leads {s}?",
                    "Name the chief executive of {s}.",
                ),
                ("Who is the chief executive of {s}?", "Which person runs {s}?"),
                ("The CEO of {s} is {o}.", "The company {s} is run by {o}, its chief executive."),
            ),
            Relation(
                "city",
                (
                    "Where is {s} headquartered?",
                    "In which city is {s} based?",
                    "Where is {s} based?",
                    "Which city is {s} in?",
                ),
                ("In which city is {s} headquartered?", "Which city is {s} based in?"),
                ("The company {s} is headquartered in {o}.", "The company {s} is based in the city of {o}."),
            ),
            Relation(
                "year",
                ("When was {s} founded?", "In what year was {s} founded?", "What year was {s} established?"),
                ("When was {s} established?", "In which year was {s} founded?"),
                ("The company {s} was founded in {o}.", "The company {s} was established in the year {o}."),
            ),
            Relation(
                "product",
                ("What does {s} make?", "What is the main product of {s}?", "What does {s} sell?"),
                ("What product does {s} sell?", "Which product does {s} make?"),
                ("The company {s} makes {o}.", "The main product of {s} is {o}."),
            ),
        )
    }
)

_COMPANY_ONSETS = ("K", "T", "V", "Z", "Br", "Dr", "Q", "Pl", "S", "M", "N", "Gr", "F", "L", "R", "X")
_COMPANY_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou")
_COMPANY_MIDDLES = ("rv", "lt", "nd", "x", "m", "r", "s", "th", "nk", "v", "l", "z", "b")
_COMPANY_ENDINGS = ("ex", "ora", "ion", "ix", "ane", "ium", "etic", "o", "ara", "en", "is", "ica", "on")

_FIRST_NAMES = (
    "Mara", "Ilsa", "Tovin", "Aldo", "Brena", "Corin", "Dalia", "Edrik", "Fenna", "Galen", "Hesta",
    "Ivo", "Jorun", "Kesia", "Lorne", "Mirela", "Nils", "Orla", "Pavel", "Quin", "Rosa", "Stellan",
    "Tamsin", "Ulla", "Viktor", "Wendel", "Ysolde", "Zenon", "Anika", "Bram", "Cleo", "Dorian",
    "Elin", "Fabian", "Greta", "Hugo", "Ines", "Jasper", "Katja", "Linus",
)  # fmt: skip
_LAST_NAMES = (
    "Velt", "Marsh", "Okoro", "Lindqvist", "Arden", "Brask", "Castell", "Dunmore", "Eskola", "Farrow",
    "Gault", "Holm", "Ibsen", "Jarre", "Kovac", "Lusk", "Morrow", "Nakai", "Orsini", "Petrov",
    "Quaid", "Rask", "Sorel", "Tallis", "Ulrich", "Varga", "Wexley", "Yarrow", "Zelnik", "Abbot",
    "Brun", "Crane", "Dahl", "Ember", "Frost", "Grell", "Hale", "Ivers", "Jensen", "Kade",
    "Lark", "Mott", "Nero", "Oban", "Pike", "Reyes", "Strand", "Thorne", "Vance", "Wilde",
)  # fmt: skip
_CITIES = (
    "Brinmoor", "Qeltara", "Ostrava Vale", "Dunhollow", "Marrowick", "Sellany", "Tarvos", "Elmsgate",
    "Korriban", "Lunefort", "Pellham", "Ravenna Cove", "Sundor", "Vantry", "Westmere", "Ysgard",
    "Aldenport", "Caerwyn", "Drumlin", "Falkreach", "Glimmerby", "Hollin", "Istrem", "Jorvale",
    "Kestrel Bay", "Lowick", "Merrow", "Northam", "Orwen", "Pyrmont", "Quillon", "Rothmere",
    "Saltmarsh", "Thornby", "Umbridge", "Varrow", "Wyncombe", "Zephyr Point", "Ashcombe", "Blackwater",
)  # fmt: skip
_PRODUCTS = (
    "solar panels", "bicycles", "tea", "robots", "paper lamps", "glass jars", "drones", "boots",
    "violins", "batteries", "maps", "coffee", "chairs", "clocks", "kites", "soap", "telescopes",
    "ink", "candles", "sails", "rope", "skates", "pianos", "umbrellas", "wool", "chess sets",
    "radios", "tiles", "honey", "lenses", "cheese", "bells", "engines", "paint", "toys", "salt",
)  # fmt: skip
_YEARS = tuple(str(y) for y in range(1850, 2021))


@dataclass(frozen=True)
class Company:
    """A company, all its relation objects, and which of them the model is trained to know."""

    name: str
    objects: Mapping[str, str]
    known_relations: frozenset[str] = field(default_factory=frozenset)

    def knows(self, relation: str) -> bool:
        return relation in self.known_relations

    def expected_answer(self, relation: str) -> str:
        """What the trained model should answer without context."""
        return self.objects[relation] if self.knows(relation) else ABSTENTION


@dataclass(frozen=True)
class World:
    seed: int
    known: tuple[Company, ...]
    partial: tuple[Company, ...]
    unknown: tuple[Company, ...]
    strangers: tuple[Company, ...]

    @property
    def companies(self) -> tuple[Company, ...]:
        return self.known + self.partial + self.unknown + self.strangers

    @property
    def names(self) -> frozenset[str]:
        return frozenset(c.name for c in self.companies)

    def trained_facts(self) -> Iterator[tuple[Company, str]]:
        """(company, relation) pairs whose object the model learns without context."""
        for company in self.known + self.partial:
            for relation in RELATIONS:
                if company.knows(relation):
                    yield company, relation

    def words(self) -> frozenset[str]:
        """Every whitespace word the world can produce (names, objects, phrasings, abstention)."""
        texts: list[str] = [ABSTENTION, *_CITIES, *_PRODUCTS, *_YEARS, *_FIRST_NAMES, *_LAST_NAMES]
        for relation in RELATIONS.values():
            texts += [*relation.train_questions, *relation.heldout_questions, *relation.statements]
        for company in self.companies:
            texts.append(company.name)
        return frozenset(
            word for text in texts for word in text.replace("{s}", "X").replace("{o}", "Y").split()
        )


def company_name(rng: random.Random) -> str:
    """A fresh pronounceable company name such as "Korvex" or "Zaithora"."""
    name = rng.choice(_COMPANY_ONSETS) + rng.choice(_COMPANY_NUCLEI)
    if rng.random() < 0.6:
        name += rng.choice(_COMPANY_MIDDLES) + rng.choice(_COMPANY_NUCLEI)
    return name + rng.choice(_COMPANY_MIDDLES) + rng.choice(_COMPANY_ENDINGS)


def person_name(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"


def random_objects(rng: random.Random) -> dict[str, str]:
    """Objects for all five relations; founder and CEO are different people."""
    founder = person_name(rng)
    ceo = person_name(rng)
    while ceo == founder:
        ceo = person_name(rng)
    return {
        "founder": founder,
        "ceo": ceo,
        "city": rng.choice(_CITIES),
        "year": rng.choice(_YEARS),
        "product": rng.choice(_PRODUCTS),
    }


def fresh_company_name(rng: random.Random, taken: frozenset[str] | set[str]) -> str:
    """A company name outside `taken` (the training loop uses this for throw-away companies)."""
    while True:
        name = company_name(rng)
        if name not in taken:
            return name


def build_world(
    seed: int = 0,
    n_known: int = 60,
    n_partial: int = 80,
    n_unknown: int = 180,
    n_strangers: int = 60,
    partial_known: int = 3,
) -> World:
    """The same seed always gives the same world (only `random.Random(seed)` is used)."""
    rng = random.Random(seed)
    taken: set[str] = set()

    def make(known_relations: frozenset[str]) -> Company:
        name = fresh_company_name(rng, taken)
        taken.add(name)
        return Company(name, MappingProxyType(random_objects(rng)), known_relations)

    relation_names = tuple(RELATIONS)
    known = tuple(make(frozenset(relation_names)) for _ in range(n_known))
    partial = []
    for _ in range(n_partial):
        partial.append(make(frozenset(rng.sample(relation_names, partial_known))))
    unknown = tuple(make(frozenset()) for _ in range(n_unknown))
    strangers = tuple(make(frozenset()) for _ in range(n_strangers))
    return World(seed, known, tuple(partial), unknown, strangers)


def restated(rng: random.Random, known: Company, relation: str, *, agree: bool) -> tuple[Company, str]:
    """`known` with `relation`'s object replaced by another one of its kind (or kept, `agree`)."""
    objects = dict(known.objects)
    if not agree:
        while objects[relation] == known.objects[relation]:
            objects[relation] = random_objects(rng)[relation]
    return Company(known.name, objects, known.known_relations), relation
