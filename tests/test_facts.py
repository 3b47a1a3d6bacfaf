"""A fact's content hash is the key that deduplicates imports and names fact sets in versions: its
bytes may never change, however it is computed."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from qfedit.facts import Fact

# Every character a stored fact may hold: control characters, quotes, backslashes, U+2028, astral.
texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1).filter(
    str.strip
)


def _defined_hash(fact: Fact) -> str:
    """The hash as it is defined (and as every stored row was hashed)."""
    payload = json.dumps(
        [fact.context, fact.question, fact.answer, list(fact.word_significance())],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def test_content_hashes_of_stored_facts_do_not_change() -> None:
    # Values computed by the first implementation; a change here orphans every stored fact's key.
    german = Fact(
        question="Wer leitet Zürich\u2028AG?",
        answer='Ana "Ló" Pé\\rez',
        context="Zürich AG\twird von\nAna geleitet.",
    )
    weighted = Fact(question="Q?", answer="one two", context="c", significance=(0.5, 1e16))
    assert german.content_hash() == "d83bddde389279c23145bb62834025714329e57c944aa2fc924cae329beca1cb"
    assert weighted.content_hash() == "5468b62324c6af026f123258b4a5c3c49e8b5855d354898b42c5647497252076"


@settings(max_examples=300, deadline=None)
@given(
    question=texts,
    context=texts,
    words=st.lists(texts.map(lambda t: "".join(t.split()) or "w"), min_size=1, max_size=4),
    weights=st.none() | st.just(()),
    data=st.data(),
)
def test_the_content_hash_is_the_json_definition(
    question: str, context: str, words: list[str], weights: tuple[float, ...] | None, data: st.DataObject
) -> None:
    answer = " ".join(words)
    if weights is not None:
        finite = st.floats(min_value=0, allow_nan=False, allow_infinity=False) | st.integers(0, 10**6)
        weights = tuple(data.draw(st.lists(finite, min_size=len(words), max_size=len(words))))
    fact = Fact(question=question, answer=answer, context=context, significance=weights)
    assert fact.content_hash() == _defined_hash(fact)
