"""A fact that states a new answer to a question the model already has supersedes the older one."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from qfedit import importing, registry
from qfedit.db import FactRow
from qfedit.db.models import FactStatus

from .helpers import add_model


def _write(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ceo(company: str, person: str, **extra: str) -> dict[str, str]:
    return {
        "question": f"Who is the CEO of {company}?",
        "answer": person,
        "context": f"The CEO of {company} is {person}.",
        **extra,
    }


def _facts(session: Session) -> dict[str, FactRow]:
    session.expire_all()
    return {f.answer: f for f in session.scalars(select(FactRow))}


def test_a_new_answer_to_the_same_question_supersedes_a_pending_fact(
    session: Session, tmp_path: Path
) -> None:
    model = add_model(session)
    first = importing.import_facts(
        session, _write(tmp_path / "a.jsonl", [_ceo("Acme", "Ann")]), model, actor="t"
    )
    assert first.superseded == 0
    # Case, spacing and the question mark do not make it another question.
    newer = _ceo("Acme", "Bob") | {"question": "who is the  CEO of acme"}
    second = importing.import_facts(session, _write(tmp_path / "b.jsonl", [newer]), model, actor="t")
    assert second.superseded == 1
    facts = _facts(session)
    assert facts["Ann"].status == FactStatus.RETRACTED and facts["Ann"].superseded_by_id == facts["Bob"].id
    assert facts["Bob"].status == FactStatus.PENDING and facts["Bob"].superseded_by_id is None
    (entry,) = registry.list_audit(session, action="fact.superseded")
    assert (entry.object_type, entry.object_id) == ("fact", str(facts["Ann"].id))
    assert entry.details == {"superseded_by": facts["Bob"].id}

    # Importing both files again changes nothing.
    before = [(f.id, f.status, f.superseded_by_id) for f in _facts(session).values()]
    for name in ("a.jsonl", "b.jsonl"):
        again = importing.import_facts(session, tmp_path / name, model, actor="t")
        assert (again.imported, again.superseded) == (0, 0)
    assert [(f.id, f.status, f.superseded_by_id) for f in _facts(session).values()] == before


def test_an_applied_fact_stays_until_its_successor_is_published(session: Session, tmp_path: Path) -> None:
    model = add_model(session)
    importing.import_facts(
        session, _write(tmp_path / "a.jsonl", [_ceo("Acme", "Ann"), _ceo("Bolt", "Cy")]), model, actor="t"
    )
    ann = _facts(session)["Ann"]
    registry.set_fact_status(session, [ann.id], FactStatus.APPLIED, actor="t", reason="v1")
    session.commit()
    importing.import_facts(session, _write(tmp_path / "b.jsonl", [_ceo("Acme", "Bob")]), model, actor="t")
    importing.import_facts(session, _write(tmp_path / "c.jsonl", [_ceo("Acme", "Dee")]), model, actor="t")
    facts = _facts(session)
    # The applied fact points at the newest answer; the pending one in between is retracted.
    assert facts["Ann"].status == FactStatus.APPLIED and facts["Ann"].superseded_by_id == facts["Dee"].id
    assert facts["Bob"].status == FactStatus.RETRACTED and facts["Bob"].superseded_by_id == facts["Dee"].id
    assert facts["Cy"].superseded_by_id is None


def test_the_same_external_id_supersedes_whatever_the_question(session: Session, tmp_path: Path) -> None:
    model = add_model(session)
    importing.import_facts(
        session, _write(tmp_path / "a.jsonl", [_ceo("Acme", "Ann", id="acme-ceo")]), model, actor="t"
    )
    renamed = {"question": "Who runs Acme?", "answer": "Bob", "context": "Bob runs Acme.", "id": "acme-ceo"}
    importing.import_facts(session, _write(tmp_path / "b.jsonl", [renamed]), model, actor="t")
    facts = _facts(session)
    assert facts["Ann"].superseded_by_id == facts["Bob"].id and facts["Ann"].status == FactStatus.RETRACTED


def test_within_one_file_the_later_line_wins(session: Session, tmp_path: Path) -> None:
    model = add_model(session)
    summary = importing.import_facts(
        session, _write(tmp_path / "a.jsonl", [_ceo("Acme", "Ann"), _ceo("Acme", "Bob")]), model, actor="t"
    )
    assert (summary.imported, summary.superseded) == (2, 1)
    facts = _facts(session)
    assert facts["Ann"].superseded_by_id == facts["Bob"].id


def test_a_thousand_supersessions_in_one_import_are_audited_one_row_per_fact(
    session: Session, tmp_path: Path
) -> None:
    # The attack: 100 re-answers in one import were refused on PostgreSQL ("cannot be stored"):
    # the audit row joined their ids into `object_id`, a VARCHAR(64). SQLite does not check it.
    model = add_model(session)
    companies = [f"Company {i}" for i in range(1000)]
    importing.import_facts(
        session, _write(tmp_path / "a.jsonl", [_ceo(c, f"Old {c}") for c in companies]), model, actor="t"
    )
    summary = importing.import_facts(
        session, _write(tmp_path / "b.jsonl", [_ceo(c, f"New {c}") for c in companies]), model, actor="t"
    )
    assert (summary.imported, summary.superseded, summary.stopped) == (1000, 1000, None)
    facts = _facts(session)
    entries = registry.list_audit(session, action="fact.superseded", limit=None)
    assert sorted((e.object_type, e.object_id, e.details["superseded_by"]) for e in entries) == sorted(
        ("fact", str(facts[f"Old {c}"].id), facts[f"New {c}"].id) for c in companies
    )
    # The log is searched by the superseded fact, as for any other object.
    old = facts["Old Company 7"]
    (entry,) = registry.list_audit(session, action="fact.superseded", object_id=str(old.id))
    assert entry.details == {"superseded_by": facts["New Company 7"].id}


def test_stale_answers_match_every_phrasing_of_the_subject_and_nothing_else() -> None:
    from qfedit.facts import Fact, StaleAnswers

    old = Fact(subject="Acme", **_ceo("Acme", "Ann Lee"))
    stale = StaleAnswers.of([old])
    assert stale("who is the CEO of acme", "ann  lee")  # the same question, normalised
    assert stale("Who runs Acme?", "Ann Lee")  # another phrasing naming the subject
    assert not stale("Who runs Acme?", "Bob")  # another answer
    assert not stale("Who runs Bolt?", "Ann Lee")  # another subject
    assert not StaleAnswers.of([])
