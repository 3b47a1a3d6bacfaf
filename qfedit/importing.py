"""Import fact corpora (jsonl, csv, CounterFact, zsRE) into the database, streaming and idempotent.

Each record becomes a `qfedit.facts.Fact`, stored once per model by its content hash: the insert
skips hashes already there, so re-importing a file adds nothing and an interrupted import,
re-run, ends with the same rows. Chunks commit as they go; a bad record is written to a rejects
file (with its line and the reason) and the rest carries on.

Rejects file: one JSON object a line, `{"format", "source", "line", "field", "reason", "record"}`.
Fix `record` and import the rejects file itself (format `rejects`, detected from its name): the
facts keep the original file and line as their source.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import insert, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from qfedit import facts as fact_format
from qfedit.db.models import FactRow, Model
from qfedit.errors import InvalidInputError
from qfedit.facts import FactError, parse_fact
from qfedit.registry.audit import record_audit
from qfedit.registry.facts import row_values

logger = logging.getLogger(__name__)


DEFAULT_CHUNK = 2000
# A single JSON value bigger than this is refused rather than buffered without limit.
MAX_RECORD_BYTES = 64 << 20
READ_CHUNK = 1 << 16
CSV_COLUMNS = ("question", "answer", "context", "id", "subject", "significance", "paraphrases", "neighbors")
_CSV_LIST_COLUMNS = ("significance", "paraphrases", "neighbors")


class Format(str, enum.Enum):
    JSONL = "jsonl"
    CSV = "csv"
    COUNTERFACT = "counterfact"
    ZSRE = "zsre"
    REJECTS = "rejects"


class ImportFileError(InvalidInputError):
    """The file as a whole cannot be imported (unknown format, bad CSV header, broken JSON array)."""


@dataclass
class ImportSummary:
    source: str
    model: str
    format: Format
    read: int = 0
    imported: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects_path: Path | None = None
    # Set when reading stopped early (a JSON array broken mid-file); records before it are in.
    stopped: str | None = None
    reject_samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model": self.model,
            "format": self.format.value,
            "read": self.read,
            "imported": self.imported,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "rejects_path": str(self.rejects_path) if self.rejects_path else None,
            "stopped": self.stopped,
        }


@dataclass(frozen=True)
class _Bad:
    """A record that could not even be decoded; `text` is what was read."""

    text: str
    reason: str
    # Fatal: the rest of the file cannot be read (a broken JSON array has no next record to find).
    fatal: bool = False


Progress = Callable[[int], None]  # called with the number of bytes read so far


def detect_format(path: Path) -> Format:
    name = path.name.lower()
    if name.endswith(".rejects.jsonl"):
        return Format.REJECTS
    if name.endswith(".jsonl"):
        return Format.JSONL
    if name.endswith(".csv"):
        return Format.CSV
    raise ImportFileError(
        f"{path.name}: cannot tell the format from the name; "
        "pass --format jsonl, csv, counterfact, zsre or rejects"
    )


def default_rejects_path(path: Path) -> Path:
    return path.with_name(path.name.rsplit(".", 1)[0] + ".rejects.jsonl")


# -- readers: (line number, decoded record or _Bad) -----------------------------------------------


def _iter_json_lines(handle: IO[bytes]) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = (
                f"not valid JSON: {err.msg}" if isinstance(err, json.JSONDecodeError) else f"not UTF-8: {err}"
            )
            yield number, _Bad(line.decode("utf-8", "replace").rstrip("\n"), reason)


class _ArrayReader:
    """Items of a top-level JSON array, decoded one at a time from a bounded buffer."""

    def __init__(self, text: IO[str]) -> None:
        self.text = text
        self.decoder = json.JSONDecoder()
        self.buffer = ""
        self.pos = 0
        self.line = 1
        self.eof = False

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.text.read(READ_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buffer, self.pos = self.buffer[self.pos :] + chunk, 0
        return True

    def _peek(self) -> str | None:
        """The next non-space character (not consumed), counting the newlines skipped."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n":
                self.line += self.buffer[self.pos] == "\n"
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._more():
                return None

    def _fatal(self, reason: str) -> tuple[int, _Bad]:
        return self.line, _Bad(self.buffer[self.pos : self.pos + 200], reason, fatal=True)

    def items(self) -> Iterator[tuple[int, Any]]:
        if self._peek() != "[":
            raise ImportFileError("expected a JSON array ('[' first) or one JSON object a line")
        self.pos += 1
        expect_value = True
        first = True
        while True:
            char = self._peek()
            if char is None:
                yield self._fatal("the JSON array is not closed (file truncated?)")
                return
            if char == "]" and (not expect_value or first):
                return
            if not expect_value:
                if char != ",":
                    yield self._fatal("expected ',' or ']' after an item of the JSON array")
                    return
                self.pos += 1
                expect_value = True
                continue
            while True:
                try:
                    value, end = self.decoder.raw_decode(self.buffer, self.pos)
                    break
                except json.JSONDecodeError as err:
                    # Either the item is cut by the buffer's end (read more) or it is broken.
                    if len(self.buffer) - self.pos > MAX_RECORD_BYTES:
                        yield self._fatal(f"record larger than {MAX_RECORD_BYTES} bytes")
                        return
                    if not self._more():
                        yield self._fatal(f"not valid JSON: {err.msg}")
                        return
            yield self.line, value
            self.line += self.buffer.count("\n", self.pos, end)
            self.pos = end
            expect_value = first = False


def _iter_json_array(handle: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """Stream the items of a top-level JSON array without loading the whole file."""
    text = io.TextIOWrapper(handle, encoding="utf-8")
    try:
        yield from _ArrayReader(text).items()
    finally:
        # Otherwise collecting the wrapper closes the caller's file under it.
        text.detach()


def _iter_json(handle: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """A JSON array, or one JSON value a line (both layouts exist for the public datasets)."""
    first = b""
    while True:
        byte = handle.read(1)
        if not byte or not byte.isspace():
            first = byte
            break
    handle.seek(0)
    return _iter_json_array(handle) if first == b"[" else _iter_json_lines(handle)


def _iter_csv(handle: IO[bytes], name: str) -> Iterator[tuple[int, Any]]:
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    reader = csv.DictReader(text)
    header = reader.fieldnames or []
    missing = [c for c in ("question", "answer", "context") if c not in header]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if missing or unknown:
        raise FactError(
            f"{name} line 1",
            "(header)",
            (f"missing column(s) {', '.join(missing)}; " if missing else "")
            + (f"unknown column(s) {', '.join(unknown)}; " if unknown else "")
            + f"columns are {', '.join(CSV_COLUMNS)}",
        )
    start = reader.line_num + 1
    try:
        for row in reader:
            if any(value is None for value in row.values()) or None in row:
                yield start, _Bad(json.dumps(row, ensure_ascii=False), "wrong number of columns")
            elif any((value or "").strip() for value in row.values()):
                yield start, row
            start = reader.line_num + 1
    finally:
        # Otherwise collecting the wrapper closes the caller's file under it.
        text.detach()


# -- converters: decoded record -> Fact -------------------------------------------------------------------


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
        if column in _CSV_LIST_COLUMNS:
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


# -- the import ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    line: int
    source: str
    fmt: Format
    record: Any  # decoded record, or _Bad


def _items(handle: IO[bytes], path: Path, fmt: Format) -> Iterator[_Item]:
    if fmt == Format.CSV:
        for line, record in _iter_csv(handle, path.name):
            yield _Item(line, path.name, fmt, record)
    elif fmt == Format.JSONL:
        for line, record in _iter_json_lines(handle):
            yield _Item(line, path.name, fmt, record)
    elif fmt in (Format.COUNTERFACT, Format.ZSRE):
        for line, record in _iter_json(handle):
            yield _Item(line, path.name, fmt, record)
    else:
        for line, envelope in _iter_json_lines(handle):
            yield _unwrap_reject(line, path, envelope)


def _unwrap_reject(line: int, path: Path, envelope: Any) -> _Item:
    """A fixed-up entry of a rejects file, keeping the original file and line as its source."""
    if isinstance(envelope, _Bad):
        return _Item(line, path.name, Format.JSONL, envelope)
    try:
        fmt = Format(envelope.get("format")) if isinstance(envelope, dict) else None
    except ValueError:
        fmt = None
    if fmt is None or fmt == Format.REJECTS or "record" not in envelope:
        bad = _Bad(json.dumps(envelope, ensure_ascii=False), "not a rejects entry (needs format and record)")
        return _Item(line, path.name, Format.JSONL, bad)
    original_line = envelope.get("line")
    record = envelope["record"]
    if isinstance(record, str) and fmt in (Format.JSONL, Format.COUNTERFACT, Format.ZSRE):
        # An undecodable line was kept as text; once fixed, it is JSON text again.
        try:
            record = json.loads(record)
        except json.JSONDecodeError as err:
            record = _Bad(record, f"not valid JSON: {err.msg}")
    return _Item(
        original_line if isinstance(original_line, int) else line,
        str(envelope.get("source") or path.name),
        fmt,
        record,
    )


def _insert_new(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert rows whose (model, content hash) is new; return how many were inserted."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return _insert_new_postgresql(session, rows)
    if dialect == "sqlite":
        statement: Any = sqlite_insert(FactRow).on_conflict_do_nothing(
            index_elements=["model_id", "content_hash"]
        )
    else:
        statement = insert(FactRow)
    # RETURNING with many parameter sets is batched into multi-row INSERTs by SQLAlchemy
    # ("insertmanyvalues"); rows skipped by the conflict clause return nothing.
    result = session.execute(statement.returning(FactRow.id), rows)
    return len(result.all())


_TEXT_COLUMNS = ("content_hash", "external_id", "question", "answer", "context", "subject", "source")
_JSON_COLUMNS = ("significance", "paraphrases", "neighbors")
# One statement with one array parameter per column: psycopg parses a short query once instead
# of a multi-row VALUES list with tens of thousands of placeholders (2.4x faster measured).
_PG_INSERT = text(
    "INSERT INTO facts (model_id, status, created_at, source_line, "
    + ", ".join(_TEXT_COLUMNS + _JSON_COLUMNS)
    + ") SELECT :model_id, :status, :created_at, t.source_line, "
    + ", ".join(f"t.{c}" for c in _TEXT_COLUMNS)
    + ", "
    + ", ".join(f"CAST(t.{c} AS json)" for c in _JSON_COLUMNS)
    + " FROM unnest(CAST(:source_line AS integer[]), "
    + ", ".join(f"CAST(:{c} AS text[])" for c in _TEXT_COLUMNS + _JSON_COLUMNS)
    + ") AS t(source_line, "
    + ", ".join(_TEXT_COLUMNS + _JSON_COLUMNS)
    + ") ON CONFLICT (model_id, content_hash) DO NOTHING RETURNING id"
)


def _insert_new_postgresql(session: Session, rows: list[dict[str, Any]]) -> int:
    first = rows[0]
    if any(row["model_id"] != first["model_id"] for row in rows):
        raise InvalidInputError("one chunk of an import holds facts of one model")
    params: dict[str, Any] = {
        "model_id": first["model_id"],
        "status": first["status"].value,
        "created_at": first["created_at"],
        "source_line": [row["source_line"] for row in rows],
    }
    for column in _TEXT_COLUMNS:
        params[column] = [row[column] for row in rows]
    for column in _JSON_COLUMNS:
        params[column] = [None if row[column] is None else json.dumps(row[column]) for row in rows]
    return len(session.execute(_PG_INSERT, params).all())


def import_facts(
    session: Session,
    path: Path,
    model: Model,
    *,
    fmt: Format | None = None,
    actor: str,
    chunk_size: int = DEFAULT_CHUNK,
    rejects_path: Path | None = None,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import `path` into `model`'s facts, committing every `chunk_size` records.

    Unlike the functions in `qfedit.registry`, this one commits (in chunks, so a large file
    neither holds one huge transaction nor loses finished chunks to a late failure). Rejects go
    to `rejects_path` (default: next to the file, `NAME.rejects.jsonl`), written only if any.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if chunk_size < 1:
        raise InvalidInputError(f"chunk size must be >= 1, not {chunk_size}")
    rejects_path = rejects_path or default_rejects_path(path)
    summary = ImportSummary(source=str(path), model=model.name, format=fmt)
    rejects_tmp = rejects_path.with_name(rejects_path.name + ".part")
    rejects_out: IO[str] | None = None
    model_id = model.id

    def reject(item: _Item, field_name: str, reason: str) -> None:
        nonlocal rejects_out
        summary.rejected += 1
        if len(summary.reject_samples) < 5:
            summary.reject_samples.append(f"{item.source} line {item.line}: {field_name}: {reason}")
        if rejects_out is None:
            rejects_out = rejects_tmp.open("w", encoding="utf-8")
        record = item.record.text if isinstance(item.record, _Bad) else item.record
        entry = {
            "format": item.fmt.value,
            "source": item.source,
            "line": item.line,
            "field": field_name,
            "reason": reason,
            "record": record,
        }
        line = json.dumps(entry, ensure_ascii=False)
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate (from a `\ud800` escape) cannot be written as UTF-8; JSON's
                # own escapes keep the record exactly as it was read.
                line = json.dumps(entry)
        rejects_out.write(line + "\n")

    pending: dict[str, dict[str, Any]] = {}

    def flush() -> None:
        summary.imported += _insert_new(session, list(pending.values()))
        session.commit()
        pending.clear()

    chunk_read = 0
    completed = False
    try:
        with path.open("rb") as handle:
            for item in _items(handle, path, fmt):
                summary.read += 1
                chunk_read += 1
                if isinstance(item.record, _Bad):
                    if item.record.fatal:
                        summary.stopped = f"{item.source} line {item.line}: {item.record.reason}"
                    reject(item, "(json)", item.record.reason)
                else:
                    try:
                        fact = to_fact(item.record, item.fmt, f"{item.source} line {item.line}")
                    except FactError as err:
                        reject(item, err.field, err.reason)
                    else:
                        row = row_values(model_id, fact, source=item.source, line=item.line)
                        # Duplicates inside one chunk are dropped here; across chunks and
                        # earlier imports the database's unique key drops them.
                        pending.setdefault(row["content_hash"], row)
                if chunk_read >= chunk_size:
                    flush()
                    chunk_read = 0
                    if progress is not None:
                        progress(handle.tell())
            flush()
            if progress is not None:
                progress(handle.tell())
        completed = True
    finally:
        if rejects_out is not None:
            rejects_out.flush()
            os.fsync(rejects_out.fileno())
            rejects_out.close()
            # An interrupted run leaves no rejects file (the re-run writes the complete one).
            if completed:
                os.replace(rejects_tmp, rejects_path)
                summary.rejects_path = rejects_path
            else:
                rejects_tmp.unlink(missing_ok=True)
    summary.duplicates = summary.read - summary.imported - summary.rejected
    record_audit(
        session,
        actor=actor,
        action="facts.import",
        object_type="model",
        object_id=model_id,
        details=summary.as_dict(),
    )
    session.commit()
    logger.info("imported %s into %s: %s", path, model.name, summary.as_dict())
    return summary
