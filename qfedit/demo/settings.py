"""How the demo model is edited: the settings `qfedit demo` registers it with.

Chosen by measurement on the shipped model with `python bench/quality.py --n 10 100 --layers 2 3 4
--lam 1 10 100 1000`. The model reads ~77% of facts from context (tests/demo), which caps efficacy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Efficacy grows with the layer (the answer is read from context by attention in the late layers):
# N = 10, lambda 10: 0.2 / 0.4 / 0.8 at layers 2 / 3 / 4. At layer 4, lambda trades efficacy for
# what the model knew, N = 100: lambda 10 gives 0.72 / 0.67 (efficacy / known facts kept), 100
# gives 0.58 / 0.80, 1000 gives 0.06 / 0.99; a ridge of 0.1 instead of 0.01 was worse on both.
DEMO_LAYER = 4
DEMO_SOLVE: dict[str, Any] = {"rule": "preserve", "lam": 10.0, "ridge": 1e-2}


def demo_settings(*, known: Path, unknown: Path) -> dict[str, Any]:
    """`ModelSettings` for the demo model: preservation over the facts it knows and its abstentions."""
    return {
        "layer": DEMO_LAYER,
        "solve": DEMO_SOLVE,
        # Transcripts of what it knows and of its abstentions: both must survive the edit.
        "preservation_corpus": [str(known), str(unknown)],
        "known_facts": str(known),
        "unknown_questions": str(unknown),
        "known_sample": 100,
    }
