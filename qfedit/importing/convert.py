"""Decoded records of each format as engine facts; a bad field raises `FactError` naming it."""

from __future__ import annotations

import json
from typing import Any

from qfedit import facts as fact_format
from qfedit.errors import InvalidInputError
from qfedit.facts import FactError, FactLimits, parse_fact
from qfedit.importing.records import CSV_LIST_COLUMNS, Format


def _field(record: Any, path: str, where: str, *, required: bool = True) -> Any:
    value = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            if required:
                raise FactError(where, path, "missing")
            return None
        value = value[key]
    return value


def _text(record: Any, path: str, where: str, *, required: bool = True) -> str | None:
    value = _field(record, path, where, required=required)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise FactError(where, path, "must be a non-empty string")
    return value


def _strings(record: Any, path: str, where: str) -> list[str]:
    value = _field(record, path, where, required=False)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FactError(where, path, "must be a list of strings")
    return value


def _from_csv(row: dict[str, str], where: str) -> fact_format.Fact:
    record: dict[str, Any] = {}
    for column, value in row.items():
        if value == "" and column not in ("question", "answer", "context"):
            continue
        if column in CSV_LIST_COLUMNS:
            try:
                record[column] = json.loads(value)
            except (ValueError, RecursionError):  # not JSON, or nested past json's recursion limit
                raise FactError(where, column, 'must be a JSON list, e.g. ["a", "b"] or [1, 0.5]') from None
        else:
            record[column] = value
    return parse_fact(record, where)


# EasyEdit's and KnowEdit's flattened layout, used for CounterFact and zsRE alike.
FLAT_FIELDS = ("prompt", "target_new")


def question_context(question: str, answer: str) -> str:
    """The context of a question-answer record. As a question and its answer, a chat model reads
    the fact and answers in its own words (SmolLM2: 25 of 40 zsRE records, "Catherine Rolfe was a
    British-American artist ..."); stated as `The answer to "Q" is A.` it read fewer (21) and
    echoed the statement, a phrasing an edit then taught for every question."""
    return f"Q: {question}\nA: {answer}"


def _nq_question(loc: str) -> str:
    # zsRE's locality questions come from Natural Questions, prefixed and without a '?'.
    question = loc.removeprefix("nq question:").strip()
    question = question[:1].upper() + question[1:]
    return question if question.endswith("?") else question + "?"


def _from_flat(record: dict[str, Any], where: str) -> fact_format.Fact:
    """`prompt`, `target_new`, `ground_truth`, `rephrase_prompt`, `locality_prompt`,
    `locality_ground_truth`, `subject`: the edit writes `target_new`; `ground_truth` (the answer
    it replaces) is what the base model is expected to say, which capture records and a version
    leaves out of its preservation and specificity (an update of what the model knows);
    the locality prompt, with its answer, is a neighbour that must not change."""
    prompt = _text(record, "prompt", where)
    answer = _text(record, "target_new", where)
    assert prompt is not None and answer is not None
    rephrase = record.get("rephrase_prompt")
    rephrases = [rephrase] if isinstance(rephrase, str) else _strings(record, "rephrase_prompt", where)
    loc = record.get("locality_prompt")
    loc_answer = record.get("locality_ground_truth")
    neighbors = []
    if loc is not None or loc_answer is not None:
        if not isinstance(loc, str) or not loc.strip():
            raise FactError(where, "locality_prompt", "must be a non-empty string with locality_ground_truth")
        if isinstance(loc_answer, list) and loc_answer and all(isinstance(a, str) for a in loc_answer):
            loc_answer = loc_answer[0]
        if not isinstance(loc_answer, str) or not loc_answer.strip():
            raise FactError(where, "locality_ground_truth", "must be a non-empty string with locality_prompt")
        neighbors.append(
            {"question": _nq_question(loc) if loc.startswith("nq question:") else loc, "answer": loc_answer}
        )
    # A question (zsRE) is given with its answer; a cloze prompt (CounterFact) is completed.
    context = question_context(prompt, answer) if prompt.rstrip().endswith("?") else f"{prompt} {answer}."
    case_id = record.get("case_id", record.get("id"))
    return parse_fact(
        {
            "id": None if case_id is None else str(case_id),
            "subject": _text(record, "subject", where, required=False),
            "context": context,
            "question": prompt,
            "answer": answer,
            "paraphrases": [r for r in rephrases if r.strip()],
            "neighbors": neighbors,
        },
        where,
    )


def _from_counterfact(record: Any, where: str, limits: FactLimits) -> fact_format.Fact:
    if not isinstance(record, dict):
        raise FactError(where, "(record)", f"expected a JSON object, got {type(record).__name__}")
    if "requested_rewrite" not in record and all(key in record for key in FLAT_FIELDS):
        return _from_flat(record, where)
    prompt = _text(record, "requested_rewrite.prompt", where)
    subject = _text(record, "requested_rewrite.subject", where)
    answer = _text(record, "requested_rewrite.target_new.str", where)
    assert prompt is not None and subject is not None and answer is not None
    if "{}" not in prompt:
        raise FactError(where, "requested_rewrite.prompt", "must contain {} where the subject goes")
    # Measured before it is made: a prompt of many {} and a long subject make a question of any size.
    length = len(prompt) + prompt.count("{}") * (len(subject) - 2)
    if length > limits.max_chars:
        raise FactError(
            where,
            "requested_rewrite.prompt",
            f"with the subject in place is {length} characters, more than the limit of {limits.max_chars}",
        )
    question = prompt.replace("{}", subject)
    true_answer = _text(record, "requested_rewrite.target_true.str", where, required=False)
    neighborhood = _strings(record, "neighborhood_prompts", where)
    if neighborhood and true_answer is None:
        raise FactError(where, "requested_rewrite.target_true.str", "needed to check neighborhood_prompts")
    case_id = record.get("case_id")
    return parse_fact(
        {
            "id": None if case_id is None else str(case_id),
            "subject": subject,
            "context": f"{question} {answer}.",
            "question": question,
            "answer": answer,
            "paraphrases": _strings(record, "paraphrase_prompts", where),
            "neighbors": [{"question": p, "answer": true_answer} for p in neighborhood],
        },
        where,
    )


def _from_zsre(record: Any, where: str) -> fact_format.Fact:
    """MEND's layout: the edit writes `alt`, the new answer (as EasyEdit's loader does);
    `answers[0]` is the true answer (what MEMIT's loader edits toward instead), which the base
    model may know: capture records what it says, as for any update of its knowledge."""
    if not isinstance(record, dict):
        raise FactError(where, "(record)", f"expected a JSON object, got {type(record).__name__}")
    if "src" not in record and all(key in record for key in FLAT_FIELDS):
        return _from_flat(record, where)
    question = _text(record, "src", where)
    answer = _text(record, "alt", where)
    assert question is not None and answer is not None  # required: `_text` raised otherwise
    rephrase = _text(record, "rephrase", where, required=False)
    loc = _text(record, "loc", where, required=False)
    loc_answer = _text(record, "loc_ans", where, required=False)
    if (loc is None) != (loc_answer is None):
        raise FactError(where, "loc_ans" if loc_answer is None else "loc", "loc and loc_ans come together")
    neighbors = []
    if loc is not None:
        neighbors.append({"question": _nq_question(loc), "answer": loc_answer})
    case_id = record.get("case_id", record.get("id"))
    return parse_fact(
        {
            "id": None if case_id is None else str(case_id),
            "subject": _text(record, "subject", where, required=False),
            "context": question_context(question, answer),
            "question": question,
            "answer": answer,
            "paraphrases": [rephrase] if rephrase else [],
            "neighbors": neighbors,
        },
        where,
    )


def to_fact(record: Any, fmt: Format, where: str, limits: FactLimits | None = None) -> fact_format.Fact:
    """One decoded record of `fmt` as a Fact within `limits` (default: `FactLimits()`); FactError
    names `where`, the field and the reason."""
    limits = limits or FactLimits()
    fact = _convert(record, fmt, where, limits)
    limits.check(fact, where)
    return fact


def _listed(record: Any, fields: tuple[str, ...], where: str, limits: FactLimits) -> None:
    # Counted before anything is built from the items (a million neighbours make a million models).
    for name in fields:
        value = record.get(name) if isinstance(record, dict) else None
        if isinstance(value, list):
            limits.check_items(value, name, where)


def _convert(record: Any, fmt: Format, where: str, limits: FactLimits) -> fact_format.Fact:
    if fmt == Format.JSONL:
        _listed(record, ("paraphrases", "neighbors"), where, limits)
        return parse_fact(record, where)
    if fmt == Format.CSV:
        if not isinstance(record, dict):
            raise FactError(where, "(record)", "expected a CSV row")
        return _from_csv(record, where)
    if fmt == Format.COUNTERFACT:
        _listed(record, ("paraphrase_prompts", "neighborhood_prompts"), where, limits)
        return _from_counterfact(record, where, limits)
    if fmt == Format.ZSRE:
        return _from_zsre(record, where)
    raise InvalidInputError(f"no converter for format {fmt.value}")
