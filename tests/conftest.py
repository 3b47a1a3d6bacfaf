from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import build_model

FAMILIES = ["qwen2", "llama", "mistral", "gemma", "gemma3_text", "phi3", "gpt2"]


def pytest_configure(config: pytest.Config) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_model(root / family, family) for family in FAMILIES}
