"""How the demo model is edited: the settings `qfedit demo` registers it with.

Chosen by measurement on the shipped model with `python bench/quality.py --n 10 100 --layers 3 4
--lam 1 10`. While the model reads context only ~15% of the time (tests/demo), efficacy is capped
near that figure whatever the settings; these choose the setting that keeps the most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The layer, rule and strength that `bench/quality.py` measured best on the shipped model: at
# N = 100, lambda 10 kept 0.89 of known facts against 0.61 for lambda 1 at layer 3; layer 4 kept less.
DEMO_LAYER = 3
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
