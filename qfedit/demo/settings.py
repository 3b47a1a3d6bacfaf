"""How the demo model is edited: the settings `qfedit demo` registers it with.

Chosen by measurement on the shipped model with `python bench/quality.py` over layers, lambdas
and ridges, on held-out figures (facts and strangers the preservation corpus does not name: the
split of `qfedit.demo.datasets`), never on what the corpus protects; the README's opening section has the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The target is the last layer's output: this model reads the answer out of its context there, so a
# single-layer edit of an earlier layer has no answer to copy. Spread over every layer below it
# (`qfedit layers` recommends 0-4), each layer changes less: at N = 100, held out, efficacy 1.00 and
# specificity 0.86 where layer 4 alone reaches 0.79 / 0.52 at its best lambda (bench/quality.py).
# Lambda trades efficacy against what the model knew; the ridge barely matters at this lambda.
DEMO_LAYER = 4
DEMO_LAYERS = [0, 1, 2, 3, 4]
DEMO_SOLVE: dict[str, Any] = {"rule": "preserve", "lam": 1000.0, "ridge": 1e-3}


def demo_settings(data_dir: Path | None = None) -> dict[str, Any]:
    """`ModelSettings` for the demo model: preservation over the preserved half of what it knows
    and of its abstentions, evaluation on the held-out halves (`qfedit.demo.datasets`)."""
    from qfedit.demo import DEMO_DATA_DIR

    folder = data_dir or DEMO_DATA_DIR
    return {
        "edit": {"layer": DEMO_LAYER, "layers": DEMO_LAYERS, "solve": DEMO_SOLVE},
        "preservation_corpus": [str(folder / "preserve.jsonl"), str(folder / "preserve_unknown.jsonl")],
        "known_facts": str(folder / "known.jsonl"),
        "unknown_questions": str(folder / "unknown.jsonl"),
        "known_sample": 100,
    }
