"""How the demo model is edited: the settings `qfedit demo` registers it with.

Chosen by measurement on the shipped model with `python bench/quality.py --n 10 100` over
`--layers 3 4`, `--lam 10 30 60 100 1000` and `--ridge` 1e-2, 1e-3 and 1e-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Layer 4, the last, is the only one whose edit shows (N = 10, lambda 10: efficacy 0 at layer 3, 1.0
# at layer 4): this model reads the answer from context in its last layer. Lambda trades efficacy
# for what the model knew, N = 100, ridge 1e-3: lambda 30 / 60 / 100 give efficacy 0.99 / 0.97 /
# 0.91, known facts kept 0.95 / 0.95 / 0.98, abstention 0.92 / 0.94 / 0.96; ridges of 1e-2 and
# 1e-4 measured within 0.01 of 1e-3.
DEMO_LAYER = 4
DEMO_SOLVE: dict[str, Any] = {"rule": "preserve", "lam": 60.0, "ridge": 1e-3}


def demo_settings(*, known: Path, unknown: Path, preserve: Path) -> dict[str, Any]:
    """`ModelSettings` for the demo model: preservation over the facts it knows and its abstentions."""
    return {
        "layer": DEMO_LAYER,
        "solve": DEMO_SOLVE,
        # Transcripts of everything it knows and of its abstentions: both must survive the edit.
        "preservation_corpus": [str(preserve), str(unknown)],
        "known_facts": str(known),
        "unknown_questions": str(unknown),
        "known_sample": 100,
    }
