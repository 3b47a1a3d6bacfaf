"""Importing corpora: every format, rejects with line numbers, idempotent and interruption-safe."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from qfedit import importing, registry
from qfedit.db import FactRow, session_factory
from qfedit.facts import Fact, FactError
from qfedit.registry.facts import row_values

from .helpers import add_model

SAMPLES = Path(importing.__file__).parent.parent / "data" / "samples"


def _rows(session: Session) -> list[tuple[Any, ...]]:
    """Everything stored about the facts except surrogate ids and timestamps."""
    session.expire_all()
    facts = session.scalars(select(FactRow).order_by(FactRow.content_hash))
    return [
        (
            f.content_hash,
            f.external_id,
            f.question,
            f.answer,
            f.context,
            f.subject,
            f.significance,
            f.paraphrases,
            f.neighbors,
            f.source,
            f.source_line,
            f.status,
        )
        for f in facts
    ]


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _fact(i: int) -> dict[str, str]:
    return {"question": f"Q{i}?", "answer": f"A{i}", "context": f"A{i} is the answer to Q{i}."}


@pytest.mark.parametrize(
    ("name", "fmt", "count"),
    [
        ("facts.jsonl", None, 4),
        ("facts.csv", None, 3),
        ("counterfact.json", "counterfact", 2),
        ("zsre.json", "zsre", 2),
    ],
)
def test_samples_import_in_every_format(session: Session, name: str, fmt: str | None, count: int) -> None:
    model = add_model(session)
    fmt_value = importing.Format(fmt) if fmt else None
    summary = importing.import_facts(
        session, SAMPLES / name, model, fmt=fmt_value, actor="alice", rejects_path=None
    )
    assert (summary.read, summary.imported, summary.duplicates, summary.rejected) == (count, count, 0, 0)
    assert len(registry.list_facts(session, model=model)) == count
    again = importing.import_facts(session, SAMPLES / name, model, fmt=fmt_value, actor="alice")
    assert (again.imported, again.duplicates) == (0, count)
    assert len(registry.list_facts(session, model=model)) == count


def test_counterfact_and_zsre_records_become_facts(session: Session) -> None:
    model = add_model(session)
    importing.import_facts(
        session, SAMPLES / "counterfact.json", model, fmt=importing.Format.COUNTERFACT, actor="a"
    )
    importing.import_facts(session, SAMPLES / "zsre.json", model, fmt=importing.Format.ZSRE, actor="a")
    by_id = {f.external_id: f for f in registry.list_facts(session, model=model)}
    cf = by_id["9001"]
    assert (cf.question, cf.answer, cf.subject) == (
        "The native language of Tobin Ardell is",
        "Welsh",
        "Tobin Ardell",
    )
    assert cf.context == "The native language of Tobin Ardell is Welsh."
    assert cf.paraphrases == ["Tobin Ardell grew up speaking"]
    assert cf.neighbors[0] == {"question": "The native language of Sigrid Holm is", "answer": "Danish"}
    assert (cf.source, cf.source_line) == ("counterfact.json", 2)
    zs = by_id["7001"]
    assert (zs.question, zs.answer) == ("Which university did Anselm Coyle attend?", "Marrow Institute")
    assert zs.paraphrases == ["Where did Anselm Coyle study?"]
    assert zs.neighbors == [{"question": "How many legs does a spider have?", "answer": "eight"}]
    assert (zs.source_line, by_id["7002"].source_line) == (2, 12)


def test_bad_records_are_rejected_with_line_and_reason_and_can_be_fixed(
    session: Session, tmp_path: Path
) -> None:
    model = add_model(session)
    source = _write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            _fact(0),
            {"question": "Q?", "answer": " ", "context": "c"},
            "{not json",
            _fact(1),
            {**_fact(2), "colour": "red"},
            _fact(0),
        ],
    )
    summary = importing.import_facts(session, source, model, actor="alice", chunk_size=2)
    assert (summary.read, summary.imported, summary.duplicates, summary.rejected) == (6, 2, 1, 3)
    assert summary.rejects_path == tmp_path / "corpus.rejects.jsonl"
    rejects = [json.loads(line) for line in summary.rejects_path.read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "answer"), (3, "(json)"), (5, "colour")]
    assert "must not be empty" in rejects[0]["reason"] and "not valid JSON" in rejects[1]["reason"]

    # The user fixes the records in the rejects file and imports it; provenance stays the original line.
    rejects[0]["record"]["answer"] = "A-fixed"
    rejects[1]["record"] = json.dumps(_fact(3))
    del rejects[2]["record"]["colour"]
    fixed = _write_jsonl(tmp_path / "corpus.rejects.jsonl", rejects)
    second = importing.import_facts(session, fixed, model, actor="alice")
    assert (second.imported, second.rejected, second.rejects_path) == (3, 0, None)
    lines = sorted(
        f.source_line for f in registry.list_facts(session, model=model) if f.source == "corpus.jsonl"
    )
    assert lines == [1, 2, 3, 4, 5]


def test_csv_header_and_cells_are_checked(session: Session, tmp_path: Path) -> None:
    model = add_model(session)
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("question,answer,colour\nQ?,A,red\n")
    with pytest.raises(FactError, match=r"h.csv line 1: field '\(header\)': missing column\(s\) context"):
        importing.import_facts(session, bad_header, model, actor="alice")
    cells = tmp_path / "c.csv"
    cells.write_text(
        'question,answer,context,paraphrases\nQ?,A,"multi\nline context",not-json\nQ2?,A2,C2,"[""P""]"\n'
    )
    summary = importing.import_facts(session, cells, model, actor="alice")
    assert (summary.imported, summary.rejected) == (1, 1)
    assert summary.rejects_path is not None
    reject = json.loads(summary.rejects_path.read_text())
    assert (reject["line"], reject["field"]) == (2, "paraphrases")
    (fact,) = registry.list_facts(session, model=model)
    assert (fact.source_line, fact.paraphrases) == (4, ["P"])


def test_an_interrupted_import_rerun_ends_with_the_same_rows(session: Session, tmp_path: Path) -> None:
    records: list[Any] = [_fact(i % 37) for i in range(100)]
    records[50] = {"question": "", "answer": "x", "context": "y"}
    source = _write_jsonl(tmp_path / "big.jsonl", records)

    reference_model = add_model(session, "reference")
    importing.import_facts(session, source, reference_model, actor="alice", chunk_size=7)
    reference = _rows(session)

    calls = 0

    def crash(done: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt

    # Same corpus into a second model, interrupted after a few chunks, then re-run to the end.
    session.execute(FactRow.__table__.delete())
    session.commit()
    model = add_model(session, "victim")
    with pytest.raises(KeyboardInterrupt):
        importing.import_facts(session, source, model, actor="alice", chunk_size=7, progress=crash)
    session.rollback()
    partial = len(registry.list_facts(session, model=model))
    assert 0 < partial < 37
    assert not (tmp_path / "big.rejects.jsonl.part").exists()
    summary = importing.import_facts(session, source, model, actor="alice", chunk_size=7)
    assert summary.imported == 37 - partial
    assert _rows(session) == reference
    assert summary.rejects_path is not None and json.loads(summary.rejects_path.read_text())["line"] == 51


def test_unknown_model_error_names_the_registered_ones(session: Session) -> None:
    add_model(session, "alpha")
    with pytest.raises(registry.NotFoundError, match=r"registered: alpha"):
        registry.get_model(session, "nope")


def test_a_row_that_is_not_utf8_is_a_reject_with_its_line(session: Session, tmp_path: Path) -> None:
    model = add_model(session)
    rows = [f"Q{i}?,A{i},C{i}".encode() for i in range(2400)]
    rows[2300] = b"Q\xff\xfe?,A,C"  # row 2,301: line 2,302 under the header
    path = tmp_path / "corpus.csv"
    path.write_bytes(b"question,answer,context\n" + b"\n".join(rows) + b"\n")
    summary = importing.import_facts(session, path, model, actor="alice", chunk_size=1000)
    assert (summary.imported, summary.rejected, summary.stopped) == (2399, 1, None)
    assert summary.rejects_path is not None
    reject = json.loads(summary.rejects_path.read_text())
    assert (reject["line"], reject["reason"]) == (2302, "not UTF-8")
    (entry,) = registry.list_audit(session, action="facts.import")
    assert entry.details["imported"] == 2399 and entry.details["completed"] is True


def test_a_stopped_import_is_in_the_audit_log_with_what_it_committed(
    session: Session, tmp_path: Path
) -> None:
    model = add_model(session)
    source = _write_jsonl(tmp_path / "big.jsonl", [_fact(i) for i in range(30)])

    def stop(done: int) -> None:
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        importing.import_facts(session, source, model, actor="alice", chunk_size=10, progress=stop)
    (entry,) = registry.list_audit(session, action="facts.import")
    assert entry.actor == "alice" and entry.details["completed"] is False
    assert entry.details["imported"] == 10 == len(registry.list_facts(session, model=model))


def test_an_import_that_fails_inside_a_chunk_keeps_the_committed_chunks_and_nothing_else(
    session: Session, tmp_path: Path
) -> None:
    # PostgreSQL copies a chunk's facts while it reads them: an error halfway through a chunk must
    # end that COPY and drop what it took, leave the earlier chunks and record the import.
    model = add_model(session)
    records: list[Any] = [_fact(i) for i in range(30)]
    records[14] = {"question": "Q?", "answer": "", "context": "c"}  # its reject is the 15th record
    source = _write_jsonl(tmp_path / "corpus.jsonl", records)
    (tmp_path / "corpus.rejects.jsonl.part").mkdir()  # where rejects are written: cannot be opened
    with pytest.raises(IsADirectoryError):
        importing.import_facts(session, source, model, actor="alice", chunk_size=10)
    assert sorted(f.question for f in registry.list_facts(session, model=model)) == sorted(
        f"Q{i}?" for i in range(10)
    )
    (entry,) = registry.list_audit(session, action="facts.import")
    assert entry.details["completed"] is False and entry.details["imported"] == 10

    (tmp_path / "corpus.rejects.jsonl.part").rmdir()
    summary = importing.import_facts(session, source, model, actor="alice", chunk_size=10)
    assert (summary.imported, summary.duplicates, summary.rejected) == (19, 10, 1)
    assert len(registry.list_facts(session, model=model)) == 29


@pytest.mark.backends("postgresql")
def test_a_fact_another_import_commits_during_the_copy_is_skipped_not_an_error(
    engine: Engine, session: Session, tmp_path: Path
) -> None:
    # The first chunk is copied without looking its facts up; another session inserts one of them
    # and commits while the COPY waits on its unique key: the chunk must fall back to the
    # skipping insert, keeping the other facts and the rival's row.
    model = add_model(session)
    session.commit()
    source = _write_jsonl(tmp_path / "facts.jsonl", [_fact(i) for i in range(20)])
    rival = session_factory(engine)()
    rival_fact = Fact.model_validate(_fact(7))
    rival.execute(insert(FactRow).values(row_values(model.id, rival_fact, source="rival.jsonl", line=1)))
    rival.flush()  # the row is in the unique index, uncommitted: the COPY waits for it
    committer = threading.Timer(0.5, rival.commit)
    committer.start()
    try:
        summary = importing.import_facts(session, source, model, actor="alice", chunk_size=50)
    finally:
        committer.join()
        rival.close()
    assert (summary.imported, summary.duplicates) == (19, 1)
    facts = registry.list_facts(session, model=model)
    assert len(facts) == 20
    assert [f.source for f in facts if f.question == "Q7?"] == ["rival.jsonl"]
