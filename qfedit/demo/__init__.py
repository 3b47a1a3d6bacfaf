"""The demo model shipped with qfedit, its synthetic world, and the data files around it.

`DEMO_MODEL_DIR` is an ordinary Hugging Face model directory (Qwen2): load it with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` like any other.
`qfedit.demo.train` reproduces it; `qfedit.demo.datasets` writes the data files.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent.parent / "data"

DEMO_MODEL_DIR: Path = _DATA / "demo-model"
DEMO_DATA_DIR: Path = _DATA / "demo"
EDITS_PATH: Path = DEMO_DATA_DIR / "edits.jsonl"
KNOWN_PATH: Path = DEMO_DATA_DIR / "known.jsonl"
PRESERVE_PATH: Path = DEMO_DATA_DIR / "preserve.jsonl"
UNKNOWN_PATH: Path = DEMO_DATA_DIR / "unknown.jsonl"
# The preserved halves (`qfedit.demo.datasets`): what an edit is told to protect, and a sample of
# it for in-sample figures. KNOWN_PATH and UNKNOWN_PATH are the held-out halves.
PRESERVE_UNKNOWN_PATH: Path = DEMO_DATA_DIR / "preserve_unknown.jsonl"
KNOWN_INSAMPLE_PATH: Path = DEMO_DATA_DIR / "known_insample.jsonl"
# Rewrites of facts the model knows (a new CEO): the update case.
UPDATES_PATH: Path = DEMO_DATA_DIR / "updates.jsonl"

__all__ = [
    "DEMO_DATA_DIR",
    "DEMO_MODEL_DIR",
    "EDITS_PATH",
    "KNOWN_INSAMPLE_PATH",
    "KNOWN_PATH",
    "PRESERVE_PATH",
    "PRESERVE_UNKNOWN_PATH",
    "UNKNOWN_PATH",
    "UPDATES_PATH",
]
