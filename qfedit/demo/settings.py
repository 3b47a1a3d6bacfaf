"""How the demo model is edited: the settings `qfedit demo` registers it with.

Chosen by measurement on the shipped model with `python bench/quality.py` over layers, lambdas
and ridges; the README's opening section has the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The last layer: this model reads the answer out of its context there, so an edit of an earlier
# layer has no answer in its with-context keys to copy. Lambda trades efficacy against what the
# model knew; the ridge barely matters at this lambda.
DEMO_LAYER = 4
DEMO_SOLVE: dict[str, Any] = {"rule": "preserve", "lam": 60.0, "ridge": 1e-3}


def demo_settings(*, known: Path, unknown: Path, preserve: Path) -> dict[str, Any]:
    """`ModelSettings` for the demo model: preservation over the facts it knows and its abstentions."""
    return {
        "edit": {"layer": DEMO_LAYER, "solve": DEMO_SOLVE},
        # Transcripts of everything it knows and of its abstentions: both must survive the edit.
        "preservation_corpus": [str(preserve), str(unknown)],
        "known_facts": str(known),
        "unknown_questions": str(unknown),
        "known_sample": 100,
    }
