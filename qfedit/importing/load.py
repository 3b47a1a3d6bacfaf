"""The import itself: stream a file's records into the database in committed chunks, with a
rejects file for what cannot be imported."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import orjson
import psycopg
from sqlalchemy import insert, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from qfedit.db.models import FactRow, Model, utcnow
from qfedit.errors import InvalidInputError
from qfedit.facts import Fact, FactError, FactLimits
from qfedit.importing.convert import to_fact
from qfedit.importing.records import (
    DEFAULT_CHUNK,
    Bad,
    Format,
    ImportSummary,
    Progress,
    decode_record,
    default_rejects_path,
    detect_format,
    iter_csv,
    iter_json,
    iter_json_lines,
)
from qfedit.registry import supersede
from qfedit.registry.audit import record_audit
from qfedit.registry.base import equals_any
from qfedit.registry.facts import row_values

logger = logging.getLogger(__name__)

# -- the import ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    line: int
    source: str
    fmt: Format
    record: Any  # decoded record, or Bad


def _items(handle: IO[bytes], path: Path, fmt: Format, label: str) -> Iterator[_Item]:
    if fmt == Format.CSV:
        for line, record in iter_csv(handle, label):
            yield _Item(line, label, fmt, record)
    elif fmt == Format.JSONL:
        for line, record in iter_json_lines(handle):
            yield _Item(line, label, fmt, record)
    elif fmt in (Format.COUNTERFACT, Format.ZSRE):
        for line, record in iter_json(handle):
            yield _Item(line, label, fmt, record)
    else:
        for line, envelope in iter_json_lines(handle):
            yield _unwrap_reject(line, label, envelope)


def _unwrap_reject(line: int, label: str, envelope: Any) -> _Item:
    """A fixed-up entry of a rejects file, keeping the original file and line as its source."""
    if isinstance(envelope, Bad):
        return _Item(line, label, Format.JSONL, envelope)
    try:
        fmt = Format(envelope.get("format")) if isinstance(envelope, dict) else None
    except ValueError:
        fmt = None
    if fmt is None or fmt == Format.REJECTS or "record" not in envelope:
        bad = Bad(json.dumps(envelope, ensure_ascii=False), "not a rejects entry (needs format and record)")
        return _Item(line, label, Format.JSONL, bad)
    original_line = envelope.get("line")
    record = envelope["record"]
    if isinstance(record, str) and fmt in (Format.JSONL, Format.COUNTERFACT, Format.ZSRE):
        # An undecodable line was kept as text; once fixed, it is JSON text again.
        record = decode_record(record)
    return _Item(
        original_line if isinstance(original_line, int) else line,
        str(envelope.get("source") or label),
        fmt,
        record,
    )


class _Inserts:
    """Where an import puts each chunk's new rows. This one keeps them for one multi-row INSERT at
    the chunk's end that skips what the unique key holds (SQLite, and any other database)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: dict[str, Any]) -> None:
        """A row new to the chunk, as soon as it is read."""

    def insert(self, rows: list[dict[str, Any]]) -> int:
        """End the chunk (`rows`: what `add` was given): insert what the model does not hold yet;
        returns how many were inserted."""
        if not rows:
            return 0
        if self.session.get_bind().dialect.name == "sqlite":
            statement: Any = sqlite_insert(FactRow).on_conflict_do_nothing(
                index_elements=["model_id", "content_hash"]
            )
        else:
            statement = insert(FactRow)
        # RETURNING with many parameter sets is batched into multi-row INSERTs by SQLAlchemy
        # ("insertmanyvalues"); rows skipped by the conflict clause return nothing.
        return len(self.session.execute(statement.returning(FactRow.id), rows).all())

    def abandon(self, error: BaseException) -> None:
        """The import stopped inside a chunk (`error`): nothing of that chunk may stay."""


_TEXT_COLUMNS = (
    "content_hash",
    "question_key",
    "external_id",
    "question",
    "answer",
    "context",
    "subject",
    "source",
)
_JSON_COLUMNS = ("significance", "paraphrases", "neighbors")
_COLUMNS = ("source_line", *_TEXT_COLUMNS, *_JSON_COLUMNS)
_PG_COPY = f"COPY facts (model_id, status, created_at, {', '.join(_COLUMNS)}) FROM STDIN"
# The way a chunk goes when the unique key refuses its COPY (facts the model already holds): it is
# copied into a temporary table and moved by one INSERT ... SELECT that skips what the key holds.
_PG_STAGE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS import_stage (source_line integer, "
    + ", ".join(f"{c} text" for c in _TEXT_COLUMNS + _JSON_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
_PG_MOVE = text(
    "INSERT INTO facts (model_id, status, created_at, "
    + ", ".join(_COLUMNS)
    + ") SELECT :model_id, :status, :created_at, "
    + ", ".join(f"CAST({c} AS json)" if c in _JSON_COLUMNS else c for c in _COLUMNS)
    + " FROM import_stage ON CONFLICT (model_id, content_hash) DO NOTHING RETURNING id"
)


def _json(value: Any) -> str | None:
    return None if value is None else "[]" if value == [] else orjson.dumps(value).decode()


_PLAIN_VALUES = itemgetter("source_line", *_TEXT_COLUMNS)
_JSON_VALUES = itemgetter(*_JSON_COLUMNS)


def _copy_values(row: dict[str, Any]) -> tuple[Any, ...]:
    """A row's values in `_COLUMNS` order, the JSON columns as JSON text (what COPY takes)."""
    return (*_PLAIN_VALUES(row), *map(_json, _JSON_VALUES(row)))


def _cursor(session: Session) -> psycopg.Cursor[Any]:
    return session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr,no-any-return]


class _CopiedInserts(_Inserts):
    """PostgreSQL: a chunk's rows go into `facts` by COPY as they are read, so the server inserts
    them on its own core while the next records are decoded and checked, and psycopg writes each
    row in C. The unique key stays the arbiter: when the chunk holds a fact the model has (a
    re-import, or one another import committed meanwhile), the COPY fails, the chunk goes back to
    its savepoint and takes the staged way, which skips what the key holds. From then on the chunks
    look their facts up before copying them, which costs less than a failed COPY once an import is
    finding known facts."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.checking = False
        self._copy: psycopg.Copy | None = None
        self._open = ExitStack()
        self._fixed: tuple[Any, ...] = ()

    def add(self, row: dict[str, Any]) -> None:
        if not self.checking:
            self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        if self._copy is None:
            cursor = _cursor(self.session)
            cursor.execute("SAVEPOINT import_copy")
            self._copy = self._open.enter_context(cursor.copy(_PG_COPY))
            # One model, status and time for the chunk (a time as text: psycopg formats a datetime
            # per row, a sixth of writing one).
            self._fixed = (row["model_id"], row["status"].value, row["created_at"].isoformat())
        self._copy.write_row((*self._fixed, *_copy_values(row)))

    def insert(self, rows: list[dict[str, Any]]) -> int:
        if self.checking and rows:
            hashes = [row["content_hash"] for row in rows]
            existing = set(
                self.session.scalars(
                    select(FactRow.content_hash).where(
                        FactRow.model_id == rows[0]["model_id"],
                        equals_any(FactRow.content_hash, hashes, "hashes"),
                    )
                )
            )
            rows = [row for row in rows if row["content_hash"] not in existing]
            for row in rows:
                self._write(row)
        if self._copy is None:
            return 0
        self._copy = None
        cursor = _cursor(self.session)
        try:
            self._open.close()  # the end of the COPY, where the server reports a refused row
        except psycopg.errors.UniqueViolation:
            cursor.execute("ROLLBACK TO SAVEPOINT import_copy")
            self.checking = True
            return self._insert_staged(rows)
        cursor.execute("RELEASE SAVEPOINT import_copy")
        return len(rows)

    def _insert_staged(self, rows: list[dict[str, Any]]) -> int:
        connection = self.session.connection()
        connection.exec_driver_sql(_PG_STAGE)
        with _cursor(self.session).copy(f"COPY import_stage ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(_copy_values(row))
        model_id, status, created_at = self._fixed
        params = {"model_id": model_id, "status": status, "created_at": created_at}
        inserted = len(self.session.execute(_PG_MOVE, params).all())
        connection.exec_driver_sql("TRUNCATE import_stage")
        return inserted

    def abandon(self, error: BaseException) -> None:
        if self._copy is None:
            return
        self._copy = None
        try:
            # psycopg ends the COPY with the error (the server drops the rows it took), then the
            # chunk's transaction goes; earlier chunks are committed.
            self._open.__exit__(type(error), error, error.__traceback__)
            self.session.rollback()
        except Exception:
            # The error that stopped the import (a lost database, say) is the one to report.
            logger.exception("the unfinished chunk's COPY could not be ended")


def _model_positions(model: Model) -> int | None:
    """The tokens a model's context holds, from the config.json of its directory when this host
    has it (as `LoadedModel.max_positions` reads it once loaded); None otherwise."""
    config = Path(model.source) / "config.json"
    try:
        with config.open("rb") as handle:
            values = json.loads(handle.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(values, dict):
        return None
    for name in ("max_position_embeddings", "n_positions"):
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_rejects_path(path: Path, rejects_path: Path, rejects_tmp: Path) -> None:
    """Refuse a rejects file that is the input: writing it (or its `.part`) while reading the input
    read back each reject as a new record, for ever, filling the disk; replacing it lost the input."""
    for target in (rejects_path, rejects_tmp):
        if target.resolve() == path.resolve() or _same_file(target, path):
            raise InvalidInputError(
                f"the rejects file {rejects_path} would overwrite the file being imported"
                + (f" (through {target.name})" if target == rejects_tmp else "")
                + "; give --rejects another path",
                field="rejects",
            )


class _Rejects:
    """The rejects file of one import: written beside the target (`.part`) as rejects come, put in
    place only when the import completes (an interrupted run leaves none: the re-run writes the
    complete one), and the first few named in the summary."""

    def __init__(self, path: Path, summary: ImportSummary) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.summary = summary
        self._out: IO[str] | None = None

    def add(self, item: _Item, field_name: str, reason: str) -> None:
        self.summary.rejected += 1
        if len(self.summary.reject_samples) < 5:
            self.summary.reject_samples.append(f"{item.source} line {item.line}: {field_name}: {reason}")
        if self._out is None:
            self._out = self.part.open("w", encoding="utf-8")
        record = item.record.text if isinstance(item.record, Bad) else item.record
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
        self._out.write(line + "\n")

    def close(self, completed: bool) -> None:
        if self._out is None:
            return
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        if completed:
            os.replace(self.part, self.path)
            self.summary.rejects_path = self.path
        else:
            self.part.unlink(missing_ok=True)


class _Chunk:
    """The facts read since the last commit: duplicates inside the chunk are dropped here (across
    chunks and earlier imports the database's unique key drops them); `commit` inserts them with
    the links to what they supersede, in one transaction."""

    def __init__(self, session: Session, model_id: int, actor: str, summary: ImportSummary) -> None:
        self.session, self.model_id, self.actor, self.summary = session, model_id, actor, summary
        self.inserts = (
            _CopiedInserts(session) if session.get_bind().dialect.name == "postgresql" else _Inserts(session)
        )
        self.pending: dict[str, dict[str, Any]] = {}
        self.started = utcnow()  # a chunk's facts are created together, in one transaction
        self.read = 0

    def add(self, fact: Fact, item: _Item) -> None:
        row = row_values(self.model_id, fact, source=item.source, line=item.line, created_at=self.started)
        if row["content_hash"] not in self.pending:
            self.pending[row["content_hash"]] = row
            self.inserts.add(row)

    def commit(self) -> None:
        rows = list(self.pending.values())
        inserted = self.inserts.insert(rows)
        superseded = supersede.link(
            self.session,
            self.model_id,
            question_keys=[row["question_key"] for row in rows],
            external_ids=[row["external_id"] for row in rows if row["external_id"]],
            actor=self.actor,
        )
        self.session.commit()
        self.summary.imported += inserted
        self.summary.superseded += len(superseded)
        self.pending.clear()
        self.started = utcnow()
        self.read = 0


def _record_import(
    session: Session,
    summary: ImportSummary,
    model_id: int,
    actor: str,
    *,
    completed: bool,
    rejects_label: str | None,
) -> None:
    """The import's audit entry, however it ended, with what was committed."""
    summary.duplicates = summary.read - summary.imported - summary.rejected
    if not completed:
        # What was committed stays; the log says so, whatever stopped the import.
        if not session.is_active:
            session.rollback()
        summary.stopped = summary.stopped or "the import stopped with an error"
    rejects_named = {"rejects_path": rejects_label} if rejects_label and summary.rejects_path else {}
    try:
        record_audit(
            session,
            actor=actor,
            action="facts.import",
            object_type="model",
            object_id=model_id,
            model_id=model_id,
            details={**summary.as_dict(), **rejects_named, "completed": completed},
        )
        session.commit()
    except Exception:
        if completed:
            raise
        # The error that stopped the import (a lost database, say) is the one to report.
        logger.exception("the stopped import of %s could not be recorded", summary.source)


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
    source: str | None = None,
    rejects_label: str | None = None,
    limits: FactLimits | None = None,
) -> ImportSummary:
    """Import `path` into `model`'s facts, committing every `chunk_size` records.

    Unlike the functions in `qfedit.registry`, this one commits (in chunks, so a large file
    neither holds one huge transaction nor loses finished chunks to a late failure). Rejects go
    to `rejects_path` (default: next to the file, `NAME.rejects.jsonl`), written only if any.
    `source` labels the facts (default: the file's name). The audit entry is written however the
    import ends, with what was committed; it names the rejects file by `rejects_label` when given
    (the API's uploads: their rejects go back in the response, and the server's temporary path
    is nothing for readers of the log). A fact over `limits` (default: `FactLimits()`; the
    model's context length too, where its config.json is on this host) is a reject naming the
    field and the limit.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if chunk_size < 1:
        raise InvalidInputError(f"chunk size must be >= 1, not {chunk_size}")
    rejects_path = rejects_path or default_rejects_path(path)
    label = source or path.name
    summary = ImportSummary(source=label, model=model.name, format=fmt)
    rejects_path.parent.mkdir(parents=True, exist_ok=True)
    rejects = _Rejects(rejects_path, summary)
    _check_rejects_path(path, rejects_path, rejects.part)
    limits = (limits or FactLimits()).for_positions(_model_positions(model))
    chunk = _Chunk(session, model.id, actor, summary)
    completed = False
    try:
        with path.open("rb") as handle:
            for item in _items(handle, path, fmt, label):
                summary.read += 1
                chunk.read += 1
                if isinstance(item.record, Bad):
                    if item.record.fatal:
                        summary.stopped = f"{item.source} line {item.line}: {item.record.reason}"
                    rejects.add(item, "(json)", item.record.reason)
                else:
                    try:
                        fact = to_fact(item.record, item.fmt, f"{item.source} line {item.line}", limits)
                    except FactError as err:
                        rejects.add(item, err.field, err.reason)
                    else:
                        chunk.add(fact, item)
                if chunk.read >= chunk_size:
                    chunk.commit()
                    if progress is not None:
                        progress(handle.tell())
            chunk.commit()
            if progress is not None:
                progress(handle.tell())
        completed = True
    except BaseException as error:
        chunk.inserts.abandon(error)
        raise
    finally:
        rejects.close(completed)
        _record_import(session, summary, model.id, actor, completed=completed, rejects_label=rejects_label)
    logger.info("imported %s into %s: %s", label, model.name, summary.as_dict())
    return summary
