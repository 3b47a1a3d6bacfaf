"""Records of any size from a write token: every text field of a fact, every record of every file
format and every nesting depth has a limit, an import rejects what passes one (naming it), a worker
refuses a fact too long for its model before it captures anything, and the lists that show facts
have a size budget (issue 27, items 1, 8 and 10)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from qfedit import importing, registry
from qfedit.config import Settings
from qfedit.db import FactRow, make_engine, session_factory
from qfedit.db.models import AuditEntry, Batch, FactCapture, Version
from qfedit.errors import InvalidInputError
from qfedit.facts import Fact, FactLimits
from qfedit.importing.records import MAX_RECORD_BYTES

from .helpers import add_model

GOOD = {"question": "Who founded Oxinnovate?", "answer": "Qi", "context": "Qi founded Oxinnovate."}


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _rejects(summary: importing.ImportSummary) -> list[dict[str, Any]]:
    assert summary.rejects_path is not None
    return [json.loads(line) for line in summary.rejects_path.read_text().splitlines()]


# -- item 1: fields, records ------------------------------------------------------------------------


def test_every_text_field_over_its_limit_is_a_reject_naming_the_field_and_the_limit(
    session: Session, tmp_path: Path
) -> None:
    """The attack: a 60 MB context imported as a pending fact (here 16,001 characters, one over the
    default limit), and the same in every other field; an id longer than its column (200) also
    failed a whole chunk on PostgreSQL."""
    model = add_model(session)
    over = "x" * 4001
    records = [
        {**GOOD, "context": "c" * 16001},
        {**GOOD, "question": over + "?"},
        {**GOOD, "answer": over},
        {**GOOD, "subject": over},
        {**GOOD, "id": "i" * 201},
        {**GOOD, "paraphrases": ["ok?", over]},
        {**GOOD, "neighbors": [{"question": "Q?", "answer": over}]},
        {**GOOD, "paraphrases": ["p?"] * 101},
        GOOD,
    ]
    summary = importing.import_facts(session, _jsonl(tmp_path / "big.jsonl", records), model, actor="t")
    assert (summary.imported, summary.rejected) == (1, 8)
    assert [(r["line"], r["field"], r["reason"]) for r in _rejects(summary)] == [
        (1, "context", "is 16001 characters, more than the limit of 16000"),
        (2, "question", "is 4002 characters, more than the limit of 4000"),
        (3, "answer", "is 4001 characters, more than the limit of 4000"),
        (4, "subject", "is 4001 characters, more than the limit of 4000"),
        (5, "id", "is 201 characters, more than the limit of 200"),
        (6, "paraphrases.1", "is 4001 characters, more than the limit of 4000"),
        (7, "neighbors.0.answer", "is 4001 characters, more than the limit of 4000"),
        (8, "paraphrases", "has 101 items, more than the limit of 100"),
    ]


def test_the_limits_are_settings_and_the_model_context_bounds_the_prompt(
    session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the importer can read the model's config.json, a prompt longer than its context
    could hold (`positions * MAX_CHARS_PER_TOKEN` characters) is rejected at import."""
    monkeypatch.setenv("QFEDIT_FACT_MAX_CHARS", "50")
    limits = Settings().fact_limits
    assert limits == FactLimits(max_chars=50, max_context_chars=16000, max_items=100)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 16}))
    model = registry.add_model(session, name="small", source=str(model_dir), fingerprint="f" * 64, actor="t")
    records = [{**GOOD, "question": "q" * 51}, {**GOOD, "context": "c" * 1100}, GOOD]
    path = _jsonl(tmp_path / "facts.jsonl", records)
    summary = importing.import_facts(session, path, model, actor="t", limits=limits)
    assert [(r["field"], r["reason"]) for r in _rejects(summary)] == [
        ("question", "is 51 characters, more than the limit of 50"),
        (
            "context",
            "question, context and answer are 1125 characters, more than the model's context of 16 "
            "tokens can hold (the limit is 1024 characters)",
        ),
    ]
    assert summary.imported == 1


def test_a_counterfact_prompt_cannot_multiply_its_subject(session: Session, tmp_path: Path) -> None:
    """The attack: a prompt of many `{}` and a long subject, each within the limits, made a
    question of gigabytes when the subject was put in place."""
    model = add_model(session)
    record = {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "{}" * 2000,
            "subject": "s" * 4000,
            "target_new": {"str": "Paris"},
        },
    }
    summary = importing.import_facts(
        session,
        _jsonl(tmp_path / "counterfact.jsonl", [record]),
        model,
        fmt=importing.Format.COUNTERFACT,
        actor="t",
    )
    ((reject),) = _rejects(summary)
    assert reject["field"] == "requested_rewrite.prompt"
    assert reject["reason"] == "with the subject in place is 8000000 characters, more than the limit of 4000"


@pytest.mark.backends("sqlite")
def test_a_jsonl_line_over_the_record_cap_is_rejected_and_the_next_one_imports(
    session: Session, tmp_path: Path
) -> None:
    """The attack: a 200 MB line imported although the README promises a 64 MiB record cap (here
    a line one MiB over it); the rest of the file still imports."""
    model = add_model(session)
    path = tmp_path / "facts.jsonl"
    with path.open("wb") as out:
        out.write(b'{"question": "Q?", "answer": "A", "context": "')
        out.write(b"x" * (MAX_RECORD_BYTES + (1 << 20)))
        out.write(b'"}\n' + json.dumps(GOOD).encode() + b"\n")
    summary = importing.import_facts(session, path, model, actor="t")
    assert (summary.read, summary.imported, summary.rejected, summary.stopped) == (2, 1, 1, None)
    ((reject),) = _rejects(summary)
    assert (reject["line"], reject["field"]) == (1, "(json)")
    assert reject["reason"] == f"record larger than {MAX_RECORD_BYTES} bytes (the limit of one record)"
    assert len(reject["record"]) <= 200  # the start of it, not the record


@pytest.mark.backends("sqlite")
def test_a_counterfact_record_over_the_cap_is_rejected_and_the_array_goes_on(
    session: Session, tmp_path: Path
) -> None:
    """The attack: a 70 MB CounterFact record imported (a decode that reached the end of the
    record took it whole); here one MiB over the cap, in the middle of a JSON array."""
    model = add_model(session)
    good = {
        "case_id": 2,
        "requested_rewrite": {"prompt": "{} is in", "subject": "Oxi", "target_new": {"str": "Paris"}},
    }
    path = tmp_path / "counterfact.json"
    with path.open("wb") as out:
        out.write(b'[{"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "')
        out.write(b"s" * (MAX_RECORD_BYTES + (1 << 20)))
        out.write(b'", "target_new": {"str": "Paris"}}},\n' + json.dumps(good).encode() + b"]")
    summary = importing.import_facts(session, path, model, actor="t")
    assert (summary.read, summary.imported, summary.rejected, summary.stopped) == (2, 1, 1, None)
    ((reject),) = _rejects(summary)
    assert reject["reason"] == f"record larger than {MAX_RECORD_BYTES} characters (the limit of one record)"


def test_a_csv_row_over_the_cap_is_rejected_and_the_rows_after_it_import(
    session: Session, tmp_path: Path
) -> None:
    """A CSV row over the cap, on one line or across quoted lines, is one reject; the reader
    finds where it ends without holding it."""
    from qfedit.importing import records

    model = add_model(session)
    path = tmp_path / "facts.csv"
    path.write_text(
        "question,answer,context\n"
        + "Q1?,A1,"
        + "x" * 17000
        + "\n"
        + 'Q2?,A2,"'
        + "y\n" * 9000
        + '"\n'
        + "Q3?,A3,C3\n"
    )
    rows = list(records.iter_csv(path.open("rb"), "facts.csv", limit=1000))
    assert [(line, getattr(row, "reason", row)) for line, row in rows] == [
        (2, "record larger than 1000 characters (the limit of one record)"),
        (3, "record larger than 1000 characters (the limit of one record)"),
        (9004, {"question": "Q3?", "answer": "A3", "context": "C3"}),
    ]
    summary = importing.import_facts(session, path, model, actor="t")
    # At the default record cap, the fact limits reject them.
    assert [(r["line"], r["field"]) for r in _rejects(summary)] == [(2, "context"), (3, "context")]
    assert summary.imported == 1


class _Reads:
    """A binary file that records the largest block any read returned."""

    def __init__(self, data: bytes) -> None:
        import io

        self.inner = io.BytesIO(data)
        self.largest = 0

    def readline(self, size: int = -1) -> bytes:
        block = self.inner.readline(size)
        self.largest = max(self.largest, len(block))
        return block


def test_a_line_over_the_cap_is_never_read_whole() -> None:
    from qfedit.importing import records

    handle = _Reads(b'{"a": 1}\n' + b"x" * 1_000_000 + b"\n" + b'{"b": 2}\n')
    lines = list(records.iter_json_lines(handle, limit=1000))  # type: ignore[arg-type]
    assert [(n, getattr(r, "reason", r)) for n, r in lines] == [
        (1, {"a": 1}),
        (2, "record larger than 1000 bytes (the limit of one record)"),
        (3, {"b": 2}),
    ]
    assert handle.largest <= records.READ_CHUNK


# -- item 8: nesting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "counterfact", "rejects"])
def test_json_nested_200000_deep_is_one_rejected_line(session: Session, tmp_path: Path, fmt: str) -> None:
    """The attack: a line of JSON nested 200,000 deep raised RecursionError, a 500 that aborted
    the whole import. Now it is one reject, as is a number of 5,000 digits (ValueError), and a
    value nested deeper than the limit but not deep enough to crash json."""
    model = add_model(session)
    deep = "[" * 200_000 + "]" * 200_000
    nested = json.dumps({**GOOD, "paraphrases": json.loads("[" * 40 + "]" * 40)})  # json decodes it
    bad = [deep, nested, '{"n": ' + "1" * 5000 + "}"]
    if fmt == "jsonl":
        path = _jsonl(tmp_path / "deep.jsonl", [*bad, GOOD])
        summary = importing.import_facts(session, path, model, actor="t")
    elif fmt == "counterfact":
        good = {"requested_rewrite": {"prompt": "{} is in", "subject": "Oxi", "target_new": {"str": "Paris"}}}
        path = tmp_path / "counterfact.json"
        path.write_text("[" + ",\n".join([*bad, json.dumps(good)]) + "]")
        summary = importing.import_facts(session, path, model, actor="t")
    else:
        entries = [
            {"format": "jsonl", "source": "a.jsonl", "line": i, "record": text}
            for i, text in enumerate(bad, 1)
        ]
        entries.append({"format": "jsonl", "source": "a.jsonl", "line": 9, "record": GOOD})
        path = _jsonl(tmp_path / "a.rejects.jsonl", entries)
        summary = importing.import_facts(
            session, path, model, actor="t", rejects_path=tmp_path / "again.jsonl"
        )
    assert (summary.imported, summary.rejected, summary.stopped) == (1, 3, None)
    reasons = [r["reason"] for r in _rejects(summary)]
    assert reasons[:2] == ["not valid JSON: nested deeper than 32 levels"] * 2
    assert reasons[2].startswith("not valid JSON: Exceeds the limit (4300 digits)")


# -- item 10: the rejects file is the input ---------------------------------------------------------------


def test_a_rejects_file_that_is_the_input_is_refused(session: Session, tmp_path: Path) -> None:
    """The attack: `qfedit import A --rejects A` replaced A with its rejects; with the rejects
    file's `.part` being the input (`import A.part --rejects A`, or a link to it), every reject was
    read back as a new record, for ever, filling the disk."""
    model = add_model(session)
    records = [{**GOOD, "answer": ""}, GOOD]
    source = _jsonl(tmp_path / "A.jsonl", records)
    before = source.read_bytes()
    part = _jsonl(tmp_path / "B.part", records)
    os.symlink(source, tmp_path / "L.jsonl.part")
    os.link(source, tmp_path / "H.jsonl")
    os.symlink(source, tmp_path / "S.jsonl")
    cases = [
        (source, source),
        (part, tmp_path / "B"),
        (source, tmp_path / "L.jsonl"),
        (source, tmp_path / "H.jsonl"),
        (source, tmp_path / "S.jsonl"),
    ]
    for path, rejects in cases:
        with pytest.raises(InvalidInputError, match="would overwrite the file being imported") as refused:
            importing.import_facts(
                session, path, model, fmt=importing.Format.JSONL, actor="t", rejects_path=rejects
            )
        assert refused.value.field == "rejects"
    assert source.read_bytes() == before and part.read_bytes() == before
    assert session.scalars(select(FactRow)).all() == []


def test_the_cli_refuses_a_rejects_file_that_is_the_input(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli import get_app

    monkeypatch.setenv("QFEDIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("QFEDIT_DATABASE_URL", database_url)
    runner = CliRunner()
    assert runner.invoke(get_app(), ["db", "upgrade"]).exit_code == 0
    engine = make_engine(database_url)
    with session_factory(engine)() as session:
        add_model(session)
        session.commit()
    engine.dispose()
    source = _jsonl(tmp_path / "A.jsonl", [{**GOOD, "answer": ""}, GOOD])
    before = source.read_bytes()
    result = runner.invoke(get_app(), ["import", str(source), "-m", "tiny", "--rejects", str(source)])
    assert result.exit_code == 2, result.output
    assert "would overwrite the file being imported" in result.output
    assert source.read_bytes() == before


# -- item 1: the worker -------------------------------------------------------------------------------


class _TokenizerSpy:
    """The model's tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.longest = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        for one in [text] if isinstance(text, str) else text:
            self.longest = max(self.longest, len(one))
        return self._tokenizer(text, *args, **kwargs)


def test_a_fact_too_long_for_the_model_is_refused_by_name_before_capture_and_stays_out(
    session: Session,
    engine: Engine,
    database_url: str,
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The attack: a fact whose context is 60 MB drove a worker from 0.5 to 11.2 GB, still
    tokenizing it. Here a fact longer than the tiny model's 128 positions (imported: its
    characters could fit) and one of 5 MB stored before facts had limits: both are refused by
    name before any capture, the batch publishes the rest, and no later batch takes them."""
    from qfedit.modeling import weights_fingerprint
    from qfedit.pipeline import publish, steps, submit
    from qfedit.store import LocalStore

    model_dir = tiny_model_dirs["qwen2"]
    model = registry.add_model(
        session,
        name="tiny",
        source=str(model_dir),
        fingerprint=weights_fingerprint(model_dir),
        actor="t",
        default_layer=1,
    )
    # A tiny random model answers nothing right, even with the fact in context.
    model.settings = {"solve": {"rule": "seed"}, "unteachable": "include", "shard_size": 2}
    session.commit()
    good = [
        {"question": "who founded Oxinnovate?", "answer": "Qi", "context": "Qi started Oxinnovate."},
        {
            "question": "who leads Brindle Labs?",
            "answer": "Mara Velt",
            "context": "Mara Velt leads Brindle Labs.",
        },
    ]
    long = {
        "question": "what city is Oxinnovate in?",
        "answer": "Castor Bay",
        "context": "Oxinnovate is in Castor Bay. " * 50,
    }
    path = _jsonl(tmp_path / "facts.jsonl", [good[0], long, good[1]])
    assert importing.import_facts(session, path, model, actor="t").imported == 3
    huge = Fact(question="who founded Ardent Works?", answer="Qi", context="Qi " * (5 << 20))
    huge_id = session.execute(
        insert(FactRow)
        .values(
            model_id=model.id,
            content_hash=huge.content_hash(),
            question=huge.question,
            answer=huge.answer,
            context=huge.context,
            source="before-limits",
        )
        .returning(FactRow.id)
    ).scalar_one()
    session.commit()
    ids = {
        f.source_line: f.id for f in registry.list_facts(session, model=model) if f.source == "facts.jsonl"
    }
    long_id = ids[2]

    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    store = LocalStore(tmp_path / "store")
    models = steps.ModelCache(settings)
    loaded = models.get(model)
    spy = _TokenizerSpy(loaded.tokenizer)
    loaded.tokenizer = spy
    batch = submit.submit_batch(session, model=model, fact_ids=None, requested_by="t", app=settings)
    session.commit()
    for shard in steps.start_batch(session, batch.id).capture:
        steps.capture_shard(session, store, models, shard)
    outcome = publish.solve_batch(session_factory(engine), store, models, batch.id, settings)
    assert outcome.version is not None and outcome.published
    assert spy.longest < 10_000, "a refused fact's text was tokenized"

    session.expire_all()
    version = session.scalars(select(Version).where(Version.batch_id == batch.id)).one()
    assert registry.version_fact_ids(session, version) == {ids[1], ids[3]}
    done = session.get(Batch, batch.id)
    assert done is not None
    excluded = {e["fact_id"]: e["reason"] for e in done.excluded_facts or []}
    assert set(excluded) == {long_id, huge_id}
    assert f"fact {long_id}: field 'context': prompt is" in excluded[long_id]
    assert "the model's context is 128" in excluded[long_id]
    assert f"fact {huge_id}: field 'context': is 15728640 characters" in excluded[huge_id]
    assert session.get(FactCapture, (huge_id, 1, model.fingerprint)).object_path == ""  # type: ignore[union-attr]
    refusal = session.scalars(select(AuditEntry).where(AuditEntry.action == "facts.refused")).all()
    assert sorted(f["fact_id"] for entry in refusal for f in entry.details["facts"]) == sorted(
        [long_id, huge_id]
    )
    # They stay pending, and out of the nightly batch, as unteachable facts do.
    assert submit.nightly_batches(session, "2099-01-01", app=settings) == []
