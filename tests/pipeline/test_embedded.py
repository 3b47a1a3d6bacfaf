"""The embedded default: no broker configured, the CLI runs a batch through the same tasks with a
broker in the data folder and a worker child, on the SQLite file in the data folder; the child
ends when its parent does, however the parent is stopped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qfedit.errors import EXIT_CODES, ErrorCode
from qfedit.facts import write_jsonl

from .conftest import _free_port, fact


def _qfedit(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _unconfigured_env() -> dict[str, str]:
    """This process's environment without any QFEDIT_ setting: the embedded default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFEDIT_")}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    return env


def _version_numbers(env: dict[str, str], cwd: Path) -> list[int]:
    return sorted(v["number"] for v in json.loads(_qfedit(env, cwd, "versions", "--json").stdout))


def test_batch_submit_runs_through_the_queue_without_configuration(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    env = _unconfigured_env()
    write_jsonl([fact(i) for i in range(3)], tmp_path / "facts.jsonl")
    steps = [
        ("model", "add", "tiny", str(tiny_model_dirs["qwen2"]), "--layer", "1", "--rule", "seed"),
        # A tiny random model answers nothing right, not even with the fact in context.
        ("model", "configure", "tiny", "--set", "unteachable=include"),
        ("import", "facts.jsonl", "--model", "tiny"),
        ("batch", "submit", "--model", "tiny"),
    ]
    for step in steps:
        done = _qfedit(env, tmp_path, *step)
        assert done.returncode == 0, f"{step}: {done.stdout}\n{done.stderr}"
    assert "batch 1 published tiny@1" in done.stdout  # names the version it made
    assert _version_numbers(env, tmp_path) == [0, 1]
    assert (tmp_path / "qfedit-data" / "qfedit.db").is_file()
    # The worker child was stopped with its batch final, its heartbeat row with it: no worker is
    # said to listen once the command has returned.
    with sqlite3.connect(tmp_path / "qfedit-data" / "qfedit.db") as db:
        assert db.execute("SELECT count(*) FROM worker_heartbeats").fetchone() == (0,)
    assert (tmp_path / "qfedit-data" / "broker").is_dir()
    assert not (tmp_path / "control").exists()  # everything in the data folder, nothing in cwd
    (listed,) = json.loads(_qfedit(env, tmp_path, "batch", "list", "--json").stdout)
    assert (listed["status"], listed["version"], listed["captured"]) == ("published", "tiny@1", 3)
    refused = _qfedit(env, tmp_path, "batch", "list", "--status", "nope")
    assert refused.returncode == EXIT_CODES[ErrorCode.INVALID] and "--status 'nope'" in refused.stderr
    # --json: stdout is one JSON document (progress goes to stderr); the facts name their model.
    fact_id = json.loads(_qfedit(env, tmp_path, "facts", "--json").stdout)[0]["id"]
    retracted = _qfedit(env, tmp_path, "retract", str(fact_id), "--reason", "test", "--json")
    assert retracted.returncode == 0, retracted.stderr
    assert json.loads(retracted.stdout)["status"] == "published"
    assert _version_numbers(env, tmp_path) == [0, 1, 2]
    # Nothing pending: a second submit is refused with the reason, and nothing changes.
    again = _qfedit(env, tmp_path, "batch", "submit", "--model", "tiny")
    assert again.returncode != 0 and "no pending facts" in again.stderr + again.stdout


def test_nightly_runs_the_nightly_batch_now_once_a_day(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """`qfedit nightly`: beat's nightly batch (same key, model and day), run now on the embedded
    default; a second run the same day makes no second batch."""
    env = _unconfigured_env()
    write_jsonl([fact(i) for i in range(2)], tmp_path / "facts.jsonl")
    for step in (
        ("model", "add", "tiny", str(tiny_model_dirs["qwen2"]), "--layer", "1", "--rule", "seed"),
        ("model", "configure", "tiny", "--set", "unteachable=include"),
        ("import", "facts.jsonl", "--model", "tiny"),
    ):
        assert _qfedit(env, tmp_path, *step).returncode == 0, step
    done = _qfedit(env, tmp_path, "nightly")
    assert done.returncode == 0, done.stderr
    assert "batch 1 published tiny@1" in done.stdout
    (batch,) = json.loads(_qfedit(env, tmp_path, "batch", "list", "--json").stdout)
    assert batch["status"] == "published"
    again = _qfedit(env, tmp_path, "nightly")
    assert again.returncode == 0 and "tiny's nightly batch of" in again.stdout, again.stderr
    assert "already published" in again.stdout
    assert len(json.loads(_qfedit(env, tmp_path, "batch", "list", "--json").stdout)) == 1


def test_demo_refuses_a_data_folder_whose_demo_model_has_other_weights(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    env = _unconfigured_env()
    added = _qfedit(
        env, tmp_path, "model", "add", "demo", str(tiny_model_dirs["qwen2"]), "--layer", "1", "--rule", "seed"
    )
    assert added.returncode == 0, added.stdout + added.stderr
    done = _qfedit(env, tmp_path, "demo")
    assert done.returncode == EXIT_CODES[ErrorCode.CONFLICT]  # other weights than registered
    assert "registered with base weights" in done.stdout + done.stderr
    # Refused before anything was imported or queued.
    assert json.loads(_qfedit(env, tmp_path, "facts", "--json").stdout) == []
    assert not (tmp_path / "qfedit-data" / "broker").exists()


def test_demo_publishes_a_version_and_prints_answers_and_quality(tmp_path: Path) -> None:
    env = _unconfigured_env()
    done = _qfedit(env, tmp_path, "demo", "--facts", "3", "--show", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "batch 1 published" in done.stdout
    # Where each part is, as configured (here the embedded default's).
    assert "database: sqlite:///" in done.stdout and "broker: embedded" in done.stdout
    assert "edited facts answered right" in done.stdout  # the table's title counts the misses
    assert "ceiling: read from context" in done.stdout and "abstention (held out)" in done.stdout
    # One fact the model knew is changed (an update), beside the new ones.
    assert "│ update" in done.stdout and "updates of what the model knew: 1" in done.stdout
    assert _version_numbers(env, tmp_path) == [0, 1]
    # A second run in the same folder is the same batch (idempotency key of the fact set).
    again = _qfedit(env, tmp_path, "demo", "--facts", "3", "--show", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _version_numbers(env, tmp_path) == [0, 1]


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting for its reaper has ended)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _embedded_worker_pid(data: Path, server: subprocess.Popen[bytes], timeout: float = 120) -> int:
    """The worker child's pid, once it runs: its heartbeat row in the embedded database."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "qfedit api exited"
        try:
            with sqlite3.connect(data / "qfedit.db") as db:
                row = db.execute("SELECT pid FROM worker_heartbeats").fetchone()
        except sqlite3.OperationalError:  # not created yet
            row = None
        if row is not None:
            return int(row[0])
        time.sleep(0.2)
    raise AssertionError("the embedded worker child never started")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_the_api_ends_its_embedded_worker_child(tmp_path: Path, signum: int) -> None:
    # The attack: `qfedit api` stopped with SIGTERM exited and left its worker child running
    # (parent 1, 0.5 GB): uvicorn re-raises the signal after shutdown, so no `finally` ran.
    # SIGKILL runs nothing at all in the parent: the kernel has to end the child.
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(_free_port()), "--log-level", "warning"],
        env=_unconfigured_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    child = None
    try:
        child = _embedded_worker_pid(tmp_path / "qfedit-data", server)
        assert _parent_of(child) == server.pid
        os.kill(server.pid, signum)
        server.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(child), f"the worker child {child} outlived `qfedit api` stopped with {signum!r}"
    finally:
        server.kill()
        server.wait()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)
