"""Reading corpus files: formats, and one reader per format yielding (line, decoded record)."""

from __future__ import annotations

import csv
import enum
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from qfedit.errors import InvalidInputError
from qfedit.facts import FactError

logger = logging.getLogger(__name__)


DEFAULT_CHUNK = 2000
# One record (a JSON line, a CSV row, an item of a JSON array) bigger than this is a reject, read
# no further than the limit: never buffered whole. Lines are counted in bytes, text (CSV rows and
# JSON arrays, which are decoded as they are read) in characters.
MAX_RECORD_BYTES = 64 << 20
# A fact nests 3 deep (neighbors, CounterFact's requested_rewrite.target_new.str): a record nested
# deeper is a reject, before anything recurses through it (json's decoder, its encoder, pydantic).
MAX_DEPTH = 32
READ_CHUNK = 1 << 16
# How much of a record too large or too deep to keep is kept in its reject.
SHOWN_CHARS = 200
CSV_COLUMNS = ("question", "answer", "context", "id", "subject", "significance", "paraphrases", "neighbors")
CSV_LIST_COLUMNS = ("significance", "paraphrases", "neighbors")


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
    superseded: int = 0
    """Older facts that facts of this import state a new answer for (qfedit.registry.supersede)."""
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
            "superseded": self.superseded,
            "rejects_path": str(self.rejects_path) if self.rejects_path else None,
            "stopped": self.stopped,
        }


@dataclass(frozen=True)
class Bad:
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
    # The public datasets' own file names (counterfact.json, zsre_mend_eval.json, ...).
    if name.endswith(".json") and "counterfact" in name:
        return Format.COUNTERFACT
    if name.endswith(".json") and "zsre" in name:
        return Format.ZSRE
    raise ImportFileError(
        f"{path.name}: cannot tell the format from the name; "
        "pass --format jsonl, csv, counterfact, zsre or rejects"
    )


def default_rejects_path(path: Path) -> Path:
    return path.with_name(path.name.rsplit(".", 1)[0] + ".rejects.jsonl")


# -- readers: (line number, decoded record or Bad) -----------------------------------------------


# A run of 19+ digits may be an integer orjson turns into a float (beyond 64 bits); json keeps it.
# Found as 19 zeros once every digit is a zero: a sixth of a regular expression's time.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_NUMBER = b"0" * 19


def decode_json(line: bytes) -> Any:
    """`json.loads(line)`, by orjson where the two agree: valid UTF-8 JSON without NaN, lone
    surrogates or integers beyond 64 bits. Whatever orjson refuses, json decides (and explains)."""
    if _LONG_NUMBER not in line.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    return json.loads(line)


def too_large(limit: int, unit: str = "bytes") -> str:
    return f"record larger than {limit} {unit} (the limit of one record)"


TOO_DEEP = f"not valid JSON: nested deeper than {MAX_DEPTH} levels"


def too_deep(value: Any) -> bool:
    """Whether `value` nests lists and objects more than `MAX_DEPTH` deep (without recursing)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def _may_be_deep(text: bytes | str, start: int = 0, end: int | None = None) -> bool:
    # More brackets than the limit, in strings or not: only then is the value walked.
    if isinstance(text, bytes):
        return text.count(b"[", start, end) + text.count(b"{", start, end) > MAX_DEPTH
    return text.count("[", start, end) + text.count("{", start, end) > MAX_DEPTH


def decode_record(text: bytes | str) -> Any:
    """One JSON record, or `Bad` saying why it is not one: not JSON, not UTF-8, nested deeper than
    `MAX_DEPTH` (json's decoder recurses, so a deep one raised RecursionError), or a number beyond
    what Python converts (over 4,300 digits)."""
    shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    try:
        value = decode_json(text) if isinstance(text, bytes) else json.loads(text)
    except json.JSONDecodeError as err:
        return Bad(shown.rstrip("\n"), f"not valid JSON: {err.msg}")
    except UnicodeDecodeError as err:
        return Bad(shown.rstrip("\n"), f"not UTF-8: {err}")
    except RecursionError:
        return Bad(shown[:SHOWN_CHARS], TOO_DEEP)
    except ValueError as err:
        return Bad(shown.rstrip("\n"), f"not valid JSON: {err}")
    if _may_be_deep(text) and too_deep(value):
        return Bad(shown[:SHOWN_CHARS], TOO_DEEP)
    return value


def iter_lines(handle: IO[bytes], limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | Bad]]:
    """`(number, line)` of each line, or a `Bad` for a line over `limit` bytes, of which no more
    than `limit` bytes are read at once: the rest is skipped a block at a time."""
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if len(line) <= limit or line.endswith(b"\n"):
            yield number, line
            continue
        while (rest := handle.readline(READ_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield number, Bad(line[:SHOWN_CHARS].decode("utf-8", "replace"), too_large(limit))


def iter_json_lines(handle: IO[bytes], limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
    for number, line in iter_lines(handle, limit):
        if isinstance(line, Bad):
            yield number, line
        elif line.strip():
            yield number, decode_record(line)


_STRUCTURE = re.compile(r'["\[\]{}]')
_IN_STRING = re.compile(r'["\\]')
_SCALAR_END = re.compile(r"[\s,\]}]")


class ArrayReader:
    """Items of a top-level JSON array, decoded one at a time from a bounded buffer: an item larger
    than `limit` characters is skipped unread, held a block at a time."""

    def __init__(self, text: IO[str], limit: int = MAX_RECORD_BYTES) -> None:
        self.text = text
        self.limit = limit
        self.decoder = json.JSONDecoder()
        self.buffer = ""
        self.pos = 0
        self.line = 1
        self.eof = False

    def _more(self, at_least: int = READ_CHUNK) -> bool:
        if self.eof:
            return False
        chunk = self.text.read(max(READ_CHUNK, at_least))
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

    def _fatal(self, reason: str) -> tuple[int, Bad]:
        return self.line, Bad(self.buffer[self.pos : self.pos + SHOWN_CHARS], reason, fatal=True)

    def _consume(self, to: int) -> None:
        self.line += self.buffer.count("\n", self.pos, to)
        self.pos = to

    def _skip_value(self) -> bool:
        """Move past the JSON value at `pos` without decoding it (brackets and strings only);
        false if the file ends inside it."""
        depth = 0
        in_string = False
        scalar = self.buffer[self.pos] not in '"[{'
        while True:
            pattern = _SCALAR_END if scalar else _IN_STRING if in_string else _STRUCTURE
            found = pattern.search(self.buffer, self.pos)
            if found is None or (in_string and found.group() == "\\" and found.end() == len(self.buffer)):
                # Keep an escape whose character is in the next block.
                self._consume(len(self.buffer) if found is None else found.start())
                if not self._more():
                    return False
                continue
            char = found.group()
            if scalar:
                self._consume(found.start())
                return True
            if in_string:
                if char == "\\":
                    self._consume(found.end() + 1)
                    continue
                in_string = False
                self._consume(found.end())
                if depth == 0:
                    return True
                continue
            self._consume(found.end())
            if char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return True

    def _decode(self) -> Any:
        """The value at `pos` (consumed), or `Bad` for one too large or too deep, skipped;
        a fatal `Bad` for what leaves no next item to find."""
        while True:
            size = len(self.buffer) - self.pos
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as err:
                # Either the item is cut by the buffer's end (read more) or it is broken.
                if size > self.limit:
                    reason = too_large(self.limit, "characters")
                    break
                # Grow the buffer by as much as the partial record holds: each retry decodes from
                # the record's start, so doubling keeps the total work linear in its size.
                if not self._more(min(size, self.limit + 1 - size)):
                    return self._fatal(f"not valid JSON: {err.msg}")[1]
                continue
            except RecursionError:
                reason = TOO_DEEP
                break
            except ValueError as err:  # an integer of more than 4,300 digits
                reason = f"not valid JSON: {err}"
                break
            if end == len(self.buffer) and self._more():
                continue  # what ends with the buffer may go on in the file (a number)
            if end - self.pos > self.limit:
                reason = too_large(self.limit, "characters")
            elif _may_be_deep(self.buffer, self.pos, end) and too_deep(value):
                reason = TOO_DEEP
            else:
                self._consume(end)
                return value
            bad = Bad(self.buffer[self.pos : self.pos + SHOWN_CHARS], reason)
            self._consume(end)
            return bad
        bad = Bad(self.buffer[self.pos : self.pos + SHOWN_CHARS], reason)
        if not self._skip_value():
            return self._fatal(f"{reason}, and the JSON array is not closed")[1]
        return bad

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
            line = self.line
            value = self._decode()
            yield line, value
            if isinstance(value, Bad) and value.fatal:
                return
            expect_value = first = False


def iter_json_array(handle: IO[bytes], limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
    """Stream the items of a top-level JSON array without loading the whole file."""
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape")
    try:
        for line, record in ArrayReader(text, limit).items():
            if not isinstance(record, Bad) and _undecodable(json.dumps(record, ensure_ascii=False)):
                yield line, Bad(_visible(json.dumps(record, ensure_ascii=False))[:200], "not UTF-8")
            else:
                yield line, record
    finally:
        # Otherwise collecting the wrapper closes the caller's file under it.
        text.detach()


def iter_json(handle: IO[bytes], limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
    """A JSON array, or one JSON value a line (both layouts exist for the public datasets)."""
    first = b""
    while True:
        byte = handle.read(1)
        if not byte or not byte.isspace():
            first = byte
            break
    handle.seek(0)
    return iter_json_array(handle, limit) if first == b"[" else iter_json_lines(handle, limit)


def _undecodable(text: str) -> bool:
    """Whether `text` holds bytes that were not UTF-8 (kept as lone surrogates by `surrogateescape`)."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _visible(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _CsvLines:
    """The lines `csv.reader` parses, none read longer than `limit` characters. Once a row passes
    `limit` in all (a row may span lines in quotes), the reader is given only each line's quotes
    and line break until the row ends: it still finds where the row ends, the row's text is never
    held, and `over` says the row is to be rejected."""

    def __init__(self, text: IO[str], limit: int) -> None:
        self.text = text
        self.limit = limit
        self.number = 0
        self.row_chars = 0
        self.over = False
        self.shown = ""
        """The start of the row being read, for its reject."""

    def new_row(self) -> None:
        self.row_chars = 0
        self.over = False

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.limit + 1)
        if not line:
            raise StopIteration
        self.number += 1
        if not self.row_chars:
            self.shown = line[:SHOWN_CHARS]
        body = line.rstrip("\r\n")
        quotes = body.count('"')
        if len(line) > self.limit and len(body) == len(line):
            # Longer than the limit: the rest of the line is read a block at a time, its quotes counted.
            while (rest := self.text.readline(READ_CHUNK)) and not rest.endswith(("\n", "\r")):
                quotes += rest.count('"')
            quotes += rest.count('"')
            self.row_chars += len(line)
            self.over = True
            # Not an empty line, which the reader would skip as no row at all.
            return '"' * quotes + "-\n"
        self.row_chars += len(line)
        self.over = self.over or self.row_chars - (len(line) - len(body)) > self.limit
        return '"' * quotes + line[len(body) :] if self.over else line


def iter_csv(handle: IO[bytes], name: str, limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
    # Bytes that are not UTF-8 are kept as lone surrogates, so a bad row is rejected with its line
    # number like any other bad row instead of stopping the import midway.
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="", errors="surrogateescape")
    lines = _CsvLines(text, limit)
    reader = csv.DictReader(lines)
    header = [_visible(name) for name in reader.fieldnames or []]
    if lines.over:
        raise FactError(f"{name} line 1", "(header)", too_large(limit, "characters"))
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
    start = lines.number + 1
    lines.new_row()
    try:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                # One broken row (a field over csv's own limit, say); the reader starts afresh.
                yield start, Bad(_visible(lines.shown), f"not valid CSV: {err}")
            else:
                if lines.over:
                    yield start, Bad(_visible(lines.shown), too_large(limit, "characters"))
                elif any(value is None for value in row.values()) or None in row:
                    yield start, Bad(json.dumps(row, ensure_ascii=False), "wrong number of columns")
                elif any(_undecodable(value or "") for value in row.values()):
                    shown = {key: _visible(value or "") for key, value in row.items()}
                    yield start, Bad(json.dumps(shown, ensure_ascii=False), "not UTF-8")
                elif any((value or "").strip() for value in row.values()):
                    yield start, row
            start = lines.number + 1
            lines.new_row()
    finally:
        # Otherwise collecting the wrapper closes the caller's file under it.
        text.detach()
