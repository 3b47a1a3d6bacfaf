"""What every room of the registry shares: name rules, id chunks, the fact-set digest."""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Dialect, String, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from qfedit.errors import InvalidInputError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Keeps `IN (...)` lists under SQLite's bound-parameter limit.
ID_CHUNK = 5000


class _Unset(enum.Enum):
    TOKEN = 0


UNSET = _Unset.TOKEN
"""An argument not given (where None means something)."""


def check_name(kind: str, name: str) -> str:
    # `@` separates model and version in references (`qwen@3`), so names cannot hold it.
    if not _NAME.fullmatch(name):  # not `match`: `$` also matches before a final newline
        raise InvalidInputError(
            f"{kind} name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def chunks(ids: Sequence[int], size: int = ID_CHUNK) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def digest_of_hashes(content_hashes: Iterable[str]) -> str:
    """Same value as `qfedit.facts.fact_set_digest` over the facts with these content hashes."""
    return hashlib.sha256("\n".join(sorted(content_hashes)).encode()).hexdigest()


class _BinaryList(list[str]):
    """A list psycopg sends in its binary form (a copy of the bytes); in text form it quotes each
    element in Python: 11 ms for 2,000 hashes, a fifth of an import's Python time."""


psycopg.adapters.register_dumper(_BinaryList, ListBinaryDumper)


class _StringArray(TypeDecorator[list[str]]):
    """`ARRAY(String)` that hands the list to psycopg as it is (ARRAY's own copies it element by element)."""

    impl = ARRAY(String)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> None:
        return None


def equals_any(column: Any, values: Sequence[str], name: str) -> ColumnElement[bool]:
    """PostgreSQL's `column = ANY(:name)` over `values`, the array parameter sent in binary. One
    array, not `IN (...)`: a prepared statement's generic plan keeps to the index on `column`."""
    return column == any_(bindparam(name, _BinaryList(values), type_=_StringArray()))
