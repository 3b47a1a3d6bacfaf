"""Import fact corpora (jsonl, csv, CounterFact, zsRE) into the database, streaming and idempotent.

Each record becomes a `qfedit.facts.Fact`, stored once per model by its content hash: the insert
skips hashes already there, so re-importing a file adds nothing and an interrupted import,
re-run, ends with the same rows. Chunks commit as they go; a bad record is written to a rejects
file (with its line and the reason) and the rest carries on.

Rejects file: one JSON object a line, `{"format", "source", "line", "field", "reason", "record"}`.
Fix `record` and import the rejects file itself (format `rejects`, detected from its name): the
facts keep the original file and line as their source.

    records.py  formats and the reader of each (jsonl, json arrays, csv, CounterFact, zsRE, rejects)
    convert.py  a decoded record as an engine fact
    load.py     the streaming, idempotent import into the database
"""

from qfedit.importing.convert import to_fact
from qfedit.importing.load import import_facts
from qfedit.importing.records import (
    DEFAULT_CHUNK,
    READ_CHUNK,
    Format,
    ImportFileError,
    ImportSummary,
    default_rejects_path,
    detect_format,
)

__all__ = [
    "DEFAULT_CHUNK",
    "READ_CHUNK",
    "Format",
    "ImportFileError",
    "ImportSummary",
    "default_rejects_path",
    "detect_format",
    "import_facts",
    "to_fact",
]
