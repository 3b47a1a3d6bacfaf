"""The streaming JSON-array reader agrees with `json.loads` wherever the read chunks split the text."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qfedit import importing
from qfedit.importing import records as readers

records = st.lists(
    st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.one_of(st.integers(), st.text(max_size=8), st.lists(st.text(max_size=3), max_size=3)),
        max_size=4,
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(items=records, indent=st.sampled_from([None, 0, 2]), chunk=st.integers(min_value=1, max_value=9))
def test_array_reader_matches_json_loads(
    items: list[dict[str, object]], indent: int | None, chunk: int
) -> None:
    text = json.dumps(items, indent=indent, ensure_ascii=False)
    old = importing.READ_CHUNK
    importing.READ_CHUNK = chunk
    try:
        decoded = list(readers.iter_json(io.BytesIO(text.encode())))
    finally:
        importing.READ_CHUNK = old
    assert [value for _, value in decoded] == items
    # Each item's line number is the line its text starts on.
    lines = [line for line, _ in decoded]
    assert lines == sorted(lines)
    if indent is not None and items:
        assert lines[0] == 2


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[{"a": 1}, {"a": 2}', "not closed"),
        ('[{"a": 1} {"a": 2}]', "expected ','"),
        ('[{"a": 1}, {"a": }]', "not valid JSON"),
    ],
)
def test_a_broken_array_stops_with_a_fatal_reject(text: str, reason: str) -> None:
    decoded = list(readers.iter_json(io.BytesIO(text.encode())))
    assert decoded[0] == (1, {"a": 1})
    bad = decoded[-1][1]
    assert isinstance(bad, readers.Bad) and bad.fatal and reason in bad.reason


def test_a_large_record_is_decoded_in_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each failed decode of a record cut by the buffer's end starts again from the record's start:
    # with a fixed read size that is quadratic in the record's size, with a doubling one linear.
    record = {"requested_rewrite": {"prompt": "x" * (4 << 20)}}
    data = json.dumps([record, {"a": 1}]).encode()
    scanned: list[int] = []
    original = json.JSONDecoder.raw_decode

    def counting(self: json.JSONDecoder, text: str, index: int = 0) -> tuple[object, int]:
        scanned.append(len(text) - index)
        return original(self, text, index)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting)
    items = list(readers.iter_json(io.BytesIO(data)))
    assert [line for line, _ in items] == [1, 1] and items[0][1] == record
    assert sum(scanned) <= 4 * len(data), f"{len(scanned)} decodes scanned {sum(scanned)} characters"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("counterfact.json", importing.Format.COUNTERFACT),
        ("zsre_mend_eval.json", importing.Format.ZSRE),
        ("facts.jsonl", importing.Format.JSONL),
        ("facts.rejects.jsonl", importing.Format.REJECTS),
    ],
)
def test_the_public_datasets_are_told_by_their_names(name: str, expected: importing.Format) -> None:
    from pathlib import Path

    assert importing.detect_format(Path(name)) == expected


# Anything a JSON line may hold, including what orjson refuses or reads otherwise than json: lone
# surrogates, NaN and infinities, integers beyond 64 bits.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(codec=None, exclude_categories=())),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(value=json_values, ascii_only=st.booleans())
def test_a_json_line_decodes_as_json_loads_decodes_it(value: object, ascii_only: bool) -> None:
    line = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    # repr tells NaN, -0.0 and 1 from 1.0 apart, which == does not.
    assert repr(readers.decode_json(line)) == repr(json.loads(line))
