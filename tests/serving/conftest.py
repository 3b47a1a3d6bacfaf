"""Deltas on the tiny models, shared by the serving and export tests; and the database fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# The database fixtures (one empty database per test, on SQLite and PostgreSQL) and the hook
# that parametrises them over backends live with the database tests; reuse them here.
from db.conftest import (  # noqa: F401
    database_url,
    empty_engine,
    engine,
    postgres_admin,
    pytest_configure,
    pytest_generate_tests,
    session,
)
from tiny_models import FACTS

from qfedit.delta import Delta
from qfedit.edit import make_delta
from qfedit.hparams import EditConfig, SolveConfig
from qfedit.modeling import load_model


def seed_delta(loaded: object, facts: list, layer: int) -> Delta:
    config = EditConfig(layer=layer, solve=SolveConfig(rule="seed"))
    return make_delta(loaded, facts, config).delta  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def deltas(tiny_model_dirs: dict[str, Path]) -> dict[str, dict[str, Delta]]:
    """Per family: `a` edits layer 1 with two facts; `b` spreads all three over layers 1 and 2."""
    found: dict[str, dict[str, Delta]] = {}
    for family in ("qwen2", "gpt2"):
        loaded = load_model(tiny_model_dirs[family])
        a = seed_delta(loaded, FACTS[:2], 1)
        b = make_delta(loaded, FACTS, EditConfig(layers=(1, 2), solve=SolveConfig(rule="seed"))).delta
        assert len(b.tensors) == 2
        found[family] = {"a": a, "b": b}
    return found
