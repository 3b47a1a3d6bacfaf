"""Facts: the unit of editing, and the JSONL format that carries them.

One JSON object a line: `question`, `answer`, `context` required; optional `id`, `subject`,
`significance` (one number per whitespace word of the answer), `paraphrases` (questions) and
`neighbors` (`{question, answer}` pairs the edit must not change).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _quote  # json's string form with ensure_ascii=False
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from qfedit.errors import InvalidInputError


class FactError(InvalidInputError):
    """A fact that cannot be used, naming where it came from and which field is wrong."""

    field: str

    def __init__(self, where: str, field: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: field {field!r}: {reason}", field=field)


def storable(value: str) -> str:
    """`value`, if a database can store it; a `ValueError` (for pydantic) if not."""
    # PostgreSQL text cannot hold NUL, and no database can encode a lone surrogate (which JSON's
    # `\ud800` escapes produce): refused here, they are one rejected record instead of a failed chunk.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


class Neighbor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    question: str
    answer: str

    @field_validator("question", "answer")
    @classmethod
    def _storable_text(cls, value: str) -> str:
        return storable(value)


class Fact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    question: str
    answer: str
    context: str
    id: str | None = None
    subject: str | None = None
    significance: tuple[float, ...] | None = None
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()

    @field_validator("question", "answer", "context")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("question", "answer", "context", "id", "subject")
    @classmethod
    def _storable_text(cls, value: str | None) -> str | None:
        return None if value is None else storable(value)

    @field_validator("paraphrases")
    @classmethod
    def _storable_paraphrases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for paraphrase in value:
            storable(paraphrase)
        return value

    @field_validator("significance")
    @classmethod
    def _one_finite_weight_per_word(
        cls, value: tuple[float, ...] | None, info: ValidationInfo
    ) -> tuple[float, ...] | None:
        if value is None:
            return value
        if any(not math.isfinite(s) or s < 0 for s in value):
            raise ValueError("every significance must be a finite number >= 0")
        answer = info.data.get("answer")
        if answer is not None and len(value) != len(answer.split()):
            raise ValueError(
                f"significance has {len(value)} values but the answer has {len(answer.split())} words"
            )
        return value

    @property
    def answer_words(self) -> list[str]:
        return self.answer.split()

    def word_significance(self) -> tuple[float, ...]:
        return self.significance if self.significance is not None else (1.0,) * len(self.answer_words)

    def question_key(self) -> str:
        return question_key(self.question)

    def content_hash(self) -> str:
        """sha256 of what the edit learns (context, question, answer, significance); stable across ids."""
        # Byte for byte `json.dumps([context, question, answer, significance], ensure_ascii=False,
        # separators=(",", ":"))`, which stored hashes were made with; written out because json
        # sets up an encoder per call, most of the time of a hash (and import hashes every fact).
        weights = ",".join(map(float.__repr__, self.word_significance()))
        payload = f"[{_quote(self.context)},{_quote(self.question)},{_quote(self.answer)},[{weights}]]"
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)


MAX_ID_CHARS = 200
"""The stored external id's column width (`facts.external_id`)."""
MAX_CHARS_PER_TOKEN = 64
"""More characters than any real tokenizer puts in one token on average over a prompt: a prompt
longer than `positions * MAX_CHARS_PER_TOKEN` characters cannot fit `positions` tokens, which is
known without tokenizing it."""


@dataclass(frozen=True)
class FactLimits:
    """How large a fact may be: characters per text field, items per list, and, where the model
    is known, characters its context could hold at all. Counting characters is cheap, so a fact
    is measured before anything tokenizes or stores it (`qfedit.config.Settings.fact_limits`)."""

    max_chars: int = 4000
    """Question, answer, subject, each paraphrase, each neighbour's question and answer."""
    max_context_chars: int = 16000
    max_items: int = 100
    """Paraphrases, and neighbours, each."""
    max_prompt_chars: int | None = None
    """Question, context and answer together: `positions * MAX_CHARS_PER_TOKEN` of a model."""

    def for_positions(self, positions: int | None) -> FactLimits:
        """These limits for a model whose context holds `positions` tokens (None: unknown)."""
        if positions is None:
            return self
        return FactLimits(
            self.max_chars, self.max_context_chars, self.max_items, positions * MAX_CHARS_PER_TOKEN
        )

    def check_text(self, value: str, field: str, where: str, *, limit: int | None = None) -> None:
        limit = self.max_chars if limit is None else limit
        if len(value) > limit:
            raise FactError(where, field, f"is {len(value)} characters, more than the limit of {limit}")

    def check_items(self, values: Sequence[object], field: str, where: str) -> None:
        if len(values) > self.max_items:
            raise FactError(where, field, f"has {len(values)} items, more than the limit of {self.max_items}")

    def check(self, fact: Fact, where: str) -> None:
        """Raise `FactError` naming the first field over its limit, and the limit."""
        self.check_text(fact.question, "question", where)
        self.check_text(fact.answer, "answer", where)
        self.check_text(fact.context, "context", where, limit=self.max_context_chars)
        if fact.subject is not None:
            self.check_text(fact.subject, "subject", where)
        if fact.id is not None:
            self.check_text(fact.id, "id", where, limit=min(self.max_chars, MAX_ID_CHARS))
        self.check_items(fact.paraphrases, "paraphrases", where)
        for i, paraphrase in enumerate(fact.paraphrases):
            self.check_text(paraphrase, f"paraphrases.{i}", where)
        self.check_items(fact.neighbors, "neighbors", where)
        for i, neighbor in enumerate(fact.neighbors):
            self.check_text(neighbor.question, f"neighbors.{i}.question", where)
            self.check_text(neighbor.answer, f"neighbors.{i}.answer", where)
        self.check_prompt(fact, where)

    def check_prompt(self, fact: Fact, where: str) -> None:
        """Raise `FactError` when the fact's prompt has more characters than its model's context
        could hold tokens of (`max_prompt_chars`)."""
        prompt = len(fact.question) + len(fact.context) + len(fact.answer)
        if self.max_prompt_chars is not None and prompt > self.max_prompt_chars:
            positions = self.max_prompt_chars // MAX_CHARS_PER_TOKEN
            raise FactError(
                where,
                "context",
                f"question, context and answer are {prompt} characters, more than the model's context "
                f"of {positions} tokens can hold (the limit is {self.max_prompt_chars} characters)",
            )


def _error_from_validation(where: str, err: ValidationError) -> FactError:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(record)"
    reason = first["msg"].removeprefix("Value error, ")
    return FactError(where, field, reason)


def parse_fact(record: Any, where: str) -> Fact:
    """Validate one decoded record; errors name `where` (e.g. "facts.jsonl line 3") and the field."""
    if not isinstance(record, dict):
        raise FactError(where, "(record)", f"expected a JSON object, got {type(record).__name__}")
    try:
        return Fact.model_validate(record)
    except ValidationError as err:
        raise _error_from_validation(where, err) from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Fact]]:
    """Stream `(line_number, fact)` from a JSONL file; blank lines are skipped; the first bad line raises."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FactError(where, "(json)", f"not valid JSON: {err.msg}") from None
            yield number, parse_fact(record, where)


def read_jsonl(path: Path) -> list[Fact]:
    return [fact for _, fact in iter_jsonl(path)]


def write_jsonl(facts: Iterable[Fact], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for fact in facts:
            handle.write(json.dumps(fact.to_json(), ensure_ascii=False) + "\n")


def fact_set_digest(facts: Iterable[Fact]) -> str:
    """Order-independent digest of a set of facts (sha256 over sorted content hashes)."""
    hashes = sorted(fact.content_hash() for fact in facts)
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def question_key(question: str) -> str:
    """sha256 of the question, case-folded, whitespace collapsed and closing punctuation dropped:
    two facts with the same key ask the same thing, so the later one's answer replaces the earlier."""
    normal = " ".join(question.casefold().split()).rstrip("?.!;: ")
    return hashlib.sha256(normal.encode()).hexdigest()


def _answer(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class StaleAnswers:
    """What superseded facts said, to leave out of what an edit keeps and is judged on.

    A (question, answer) states a superseded answer when it gives that answer to the same question
    (`question_key`), or, for a fact with a subject, to any question that names the subject: a
    corpus asks a fact in many phrasings ("Who runs X?", "Who is the CEO of X?")."""

    keys: frozenset[tuple[str, str]] = frozenset()
    subjects: frozenset[tuple[str, str]] = frozenset()
    """(normalised answer, subject)"""

    @staticmethod
    def of(facts: Iterable[Fact]) -> StaleAnswers:
        facts = list(facts)
        return StaleAnswers(
            frozenset((f.question_key(), _answer(f.answer)) for f in facts),
            frozenset((_answer(f.answer), f.subject) for f in facts if f.subject),
        )

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __call__(self, question: str, answer: str) -> bool:
        said = _answer(answer)
        if (question_key(question), said) in self.keys:
            return True
        return any(said == old and subject in question for old, subject in self.subjects)
