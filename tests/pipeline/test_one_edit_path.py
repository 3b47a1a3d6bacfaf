"""One edit path: `qfedit edit` in one process and a batch through the queue (a real worker
process, the store, SQLite) solve bitwise the same delta, with the same metadata, for the same
facts and settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qfedit.config import Settings
from qfedit.db import Version, make_engine, session_factory
from qfedit.delta import Delta
from qfedit.facts import write_jsonl
from qfedit.store import store_from_settings

from .conftest import fact
from .test_embedded import _qfedit, _unconfigured_env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("count", "layers"),
    [(5, None), (70, None), (70, "0,1")],
    ids=["dual-5-facts", "primal-70-facts-2-shards", "spread-over-layers-0-1"],
)
def test_cli_and_queue_make_bitwise_identical_deltas(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, count: int, layers: str | None
) -> None:
    model_dir = tiny_model_dirs["qwen2"]
    env = _unconfigured_env()
    write_jsonl([fact(i) for i in range(count)], tmp_path / "facts.jsonl")
    # Inside the data folder, the default corpus root: model settings may name no file outside it.
    (tmp_path / "qfedit-data").mkdir()
    write_jsonl([fact(i) for i in range(1000, 1030)], tmp_path / "qfedit-data" / "corpus.jsonl")
    solve = ("--lam", "3", "--ridge", "0.01")
    out = ("--out", "cli.safetensors", "--preserve", "qfedit-data/corpus.jsonl")
    steps = [
        ("model", "add", "tiny", str(model_dir), "--layer", "1", "--preserve", "qfedit-data/corpus.jsonl"),
        ("model", "configure", "tiny", "--set", "solve.lam=3", "--set", "solve.ridge=0.01"),
        # A tiny random model answers nothing right, not even with the fact in context.
        ("model", "configure", "tiny", "--set", "unteachable=include"),
        ("import", "facts.jsonl", "--model", "tiny"),
        ("batch", "submit", "--model", "tiny"),
    ]
    if layers is not None:
        steps.insert(3, ("model", "configure", "tiny", "--set", f"layers={layers}"))
    spread = ("--layers", layers) if layers is not None else ("--layer", "1")
    for step in steps:
        done = _qfedit(env, tmp_path, *step)
        assert done.returncode == 0, f"{step}: {done.stdout}\n{done.stderr}"
    edited = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "edit",
            str(model_dir),
            "facts.jsonl",
            *spread,
            *solve,
            *out,
            "--unteachable",
            "include",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert edited.returncode == 0, edited.stdout + edited.stderr

    settings = Settings(data_dir=tmp_path / "qfedit-data")
    engine = make_engine(settings.resolved_database_url)
    try:
        with session_factory(engine)() as session:
            version = session.query(Version).filter(Version.number == 1).one()
            path, sha = version.checkpoint_path, version.checkpoint_sha256
            assert path is not None and sha is not None
    finally:
        engine.dispose()
    queued = Delta.from_bytes(store_from_settings(settings).read_bytes(path, sha))
    local = Delta.load(tmp_path / "cli.safetensors")

    assert queued.base_fingerprint == local.base_fingerprint
    assert sorted(queued.tensors) == sorted(local.tensors)
    for name, tensor in queued.tensors.items():
        assert torch.equal(tensor, local.tensors[name]), name  # bitwise, not close
    assert dict(queued.metadata) == dict(local.metadata)
    # The metadata says what made the delta, whichever path made it.
    meta = queued.metadata
    assert meta["form"] == ("dual" if count == 5 else "primal")
    assert meta["hparams"]["solve"] == {"rule": "preserve", "lam": 3.0, "ridge": 0.01} | {
        k: meta["hparams"]["solve"][k] for k in ("max_condition", "form")
    }
    assert meta["facts"] == count and meta["corpus_digest"] and meta["fact_set_digest"]
    if layers is not None:
        assert meta["layers"] == [0, 1] and len(queued.tensors) == 2
    assert "promote" not in meta["hparams"] and "shard_size" not in meta["hparams"]
