"""Decoded records of each format as engine facts; a bad field raises `FactError` naming it."""

from __future__ import annotations

import json
from typing import Any

from qfedit import facts as fact_format
from qfedit.errors import InvalidInputError
from qfedit.facts import FactError, parse_fact
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
            except json.JSONDecodeError:
                raise FactError(where, column, 'must be a JSON list, e.g. ["a", "b"] or [1, 0.5]') from None
        else:
            record[column] = value
    return parse_fact(record, where)


def _from_counterfact(record: Any, where: str) -> fact_format.Fact:
    if not isinstance(record, dict):
        raise FactError(where, "(record)", f"expected a JSON object, got {type(record).__name__}")
    prompt = _text(record, "requested_rewrite.prompt", where)
    subject = _text(record, "requested_rewrite.subject", where)
    answer = _text(record, "requested_rewrite.target_new.str", where)
    assert prompt is not None and subject is not None and answer is not None
    if "{}" not in prompt:
        raise FactError(where, "requested_rewrite.prompt", "must contain {} where the subject goes")
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
    if not isinstance(record, dict):
        raise FactError(where, "(record)", f"expected a JSON object, got {type(record).__name__}")
    question = _text(record, "src", where)
    answer = _text(record, "alt", where)
    rephrase = _text(record, "rephrase", where, required=False)
    loc = _text(record, "loc", where, required=False)
    loc_answer = _text(record, "loc_ans", where, required=False)
    if (loc is None) != (loc_answer is None):
        raise FactError(where, "loc_ans" if loc_answer is None else "loc", "loc and loc_ans come together")
    neighbors = []
    if loc is not None:
        # zsRE's locality questions come from Natural Questions, prefixed and without a '?'.
        loc_question = loc.removeprefix("nq question:").strip()
        loc_question = loc_question[:1].upper() + loc_question[1:]
        if not loc_question.endswith("?"):
            loc_question += "?"
        neighbors.append({"question": loc_question, "answer": loc_answer})
    case_id = record.get("case_id", record.get("id"))
    return parse_fact(
        {
            "id": None if case_id is None else str(case_id),
            "subject": _text(record, "subject", where, required=False),
            "context": f'The answer to "{question}" is {answer}.',
            "question": question,
            "answer": answer,
            "paraphrases": [rephrase] if rephrase else [],
            "neighbors": neighbors,
        },
        where,
    )


def to_fact(record: Any, fmt: Format, where: str) -> fact_format.Fact:
    """One decoded record of `fmt` as a Fact; FactError names `where`, the field and the reason."""
    if fmt == Format.JSONL:
        return parse_fact(record, where)
    if fmt == Format.CSV:
        if not isinstance(record, dict):
            raise FactError(where, "(record)", "expected a CSV row")
        return _from_csv(record, where)
    if fmt == Format.COUNTERFACT:
        return _from_counterfact(record, where)
    if fmt == Format.ZSRE:
        return _from_zsre(record, where)
    raise InvalidInputError(f"no converter for format {fmt.value}")
