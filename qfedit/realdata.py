"""Real benchmark data for real pretrained models, and the held-out protocol they are judged by.

    records = zsre_records()                        # 2,037 zsRE records (MEND's layout)
    split = protocol_split(len(records))            # preserve / known / edit pool, fixed
    facts = [record_fact(records[i], "zsre") for i in draw(split.edit_pool, 100, seed=1)]

The files (`qfedit/data/real/`, sources in its README): zsRE in MEND's layout, 1,037 records of
its evaluation split and 1,000 of its training split; CounterFact in the flattened layout of
EasyEdit and KnowEdit, its first 2,000 edit records.

What a user of a pretrained model can preserve is what the model already says: the preservation
corpus is the model's own greedy answers (no context) to broad questions. Here those questions are
the Natural Questions that zsRE pairs with its records (`loc`). Each dataset's records are split once, by a
fixed seed, into disjoint parts: the locality questions of zsRE's `preserve` part make the corpus;
those of its `known` part, and the edited records' own, judge whether greedy answers stay
unchanged; CounterFact's `known` part gives the world facts the model states right (the true
answers, `ground_truth`), which judge whether it still does; edits are drawn from the `edit pool`.
None of what is judged is in a corpus or a tuning run (held out). Settings are tuned on one draw
and reported on another (`draw`'s seed).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from qfedit.facts import Fact
from qfedit.importing.convert import to_fact
from qfedit.importing.records import Format

REAL_DATA_DIR = Path(__file__).parent / "data" / "real"
Dataset = Literal["zsre", "counterfact"]
SPLIT_SEED = 20261207
PARTS: dict[str, tuple[int, int]] = {"zsre": (400, 300), "counterfact": (0, 600)}
"""Records in the preservation and known parts of each dataset."""


@cache
def _records(dataset: Dataset) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads((REAL_DATA_DIR / f"{dataset}.json").read_text(encoding="utf-8")))


def records(dataset: Dataset) -> tuple[dict[str, Any], ...]:
    return _records(dataset)


def record_fact(record: dict[str, Any], dataset: Dataset) -> Fact:
    """The fact `qfedit import --format <dataset>` makes of the record."""
    fmt = Format.ZSRE if dataset == "zsre" else Format.COUNTERFACT
    return to_fact(record, fmt, f"{dataset} case {record.get('case_id')}")


@dataclass(frozen=True)
class Split:
    preserve: tuple[int, ...]
    known: tuple[int, ...]
    edit_pool: tuple[int, ...]


def protocol_split(dataset: Dataset, *, seed: int = SPLIT_SEED) -> Split:
    """Record indexes of `dataset` in three disjoint parts (see the module's docstring), fixed by
    `seed`: zsRE's preservation part gives the corpus its questions, CounterFact's known part the
    world facts that specificity checks (those the model states right)."""
    order = list(range(len(records(dataset))))
    random.Random(seed).shuffle(order)
    preserve, known = PARTS[dataset]
    return Split(
        tuple(sorted(order[:preserve])),
        tuple(sorted(order[preserve : preserve + known])),
        tuple(sorted(order[preserve + known :])),
    )


def draw(pool: Sequence[int], n: int, *, seed: int) -> list[int]:
    """`n` record indexes of `pool`, drawn by `seed` (a tuning seed and a report seed differ)."""
    if n > len(pool):
        raise ValueError(f"draw of {n} from a pool of {len(pool)}")
    return sorted(random.Random(seed).sample(list(pool), n))


def nq_question(loc: str) -> str:
    question = loc.removeprefix("nq question:").strip()
    question = question[:1].upper() + question[1:]
    return question if question.endswith("?") else question + "?"


def locality_questions(indexes: Sequence[int]) -> list[tuple[str, str]]:
    """(question, reference answer) of zsRE's Natural Questions for these records."""
    zsre = records("zsre")
    return [(nq_question(zsre[i]["loc"]), zsre[i]["loc_ans"]) for i in indexes]
