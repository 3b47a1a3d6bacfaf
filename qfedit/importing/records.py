"""Reading corpus files: formats, and one reader per format yielding (line, decoded record)."""

from __future__ import annotations

import csv
import enum
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from qfedit.errors import InvalidInputError
from qfedit.facts import FactError

logger = logging.getLogger(__name__)


DEFAULT_CHUNK = 2000
# A single JSON value bigger than this is refused rather than buffered without limit.
MAX_RECORD_BYTES = 64 << 20
READ_CHUNK = 1 << 16
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


def iter_json_lines(handle: IO[bytes]) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield number, decode_json(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = (
                f"not valid JSON: {err.msg}" if isinstance(err, json.JSONDecodeError) else f"not UTF-8: {err}"
            )
            yield number, Bad(line.decode("utf-8", "replace").rstrip("\n"), reason)


class ArrayReader:
    """Items of a top-level JSON array, decoded one at a time from a bounded buffer."""

    def __init__(self, text: IO[str]) -> None:
        self.text = text
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
        return self.line, Bad(self.buffer[self.pos : self.pos + 200], reason, fatal=True)

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
                    # Grow the buffer by as much as the partial record holds: each retry decodes
                    # from the record's start, so doubling keeps the total work linear in its size.
                    if not self._more(len(self.buffer) - self.pos):
                        yield self._fatal(f"not valid JSON: {err.msg}")
                        return
            yield self.line, value
            self.line += self.buffer.count("\n", self.pos, end)
            self.pos = end
            expect_value = first = False


def iter_json_array(handle: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """Stream the items of a top-level JSON array without loading the whole file."""
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape")
    try:
        for line, record in ArrayReader(text).items():
            if not isinstance(record, Bad) and _undecodable(json.dumps(record, ensure_ascii=False)):
                yield line, Bad(_visible(json.dumps(record, ensure_ascii=False))[:200], "not UTF-8")
            else:
                yield line, record
    finally:
        # Otherwise collecting the wrapper closes the caller's file under it.
        text.detach()


def iter_json(handle: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """A JSON array, or one JSON value a line (both layouts exist for the public datasets)."""
    first = b""
    while True:
        byte = handle.read(1)
        if not byte or not byte.isspace():
            first = byte
            break
    handle.seek(0)
    return iter_json_array(handle) if first == b"[" else iter_json_lines(handle)


def _undecodable(text: str) -> bool:
    """Whether `text` holds bytes that were not UTF-8 (kept as lone surrogates by `surrogateescape`)."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _visible(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def iter_csv(handle: IO[bytes], name: str) -> Iterator[tuple[int, Any]]:
    # Bytes that are not UTF-8 are kept as lone surrogates, so a bad row is rejected with its line
    # number like any other bad row instead of stopping the import midway.
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="", errors="surrogateescape")
    reader = csv.DictReader(text)
    header = [_visible(name) for name in reader.fieldnames or []]
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
                yield start, Bad(json.dumps(row, ensure_ascii=False), "wrong number of columns")
            elif any(_undecodable(value or "") for value in row.values()):
                shown = {key: _visible(value or "") for key, value in row.items()}
                yield start, Bad(json.dumps(shown, ensure_ascii=False), "not UTF-8")
            elif any((value or "").strip() for value in row.values()):
                yield start, row
            start = reader.line_num + 1
    finally:
        # Otherwise collecting the wrapper closes the caller's file under it.
        text.detach()
