"""Who runs a batch: worker heartbeats, `batch submit` naming the listeners (real Redis and worker
processes), `qfedit api` on the embedded default running what is posted to it, and a batch whose
task waits for cores saying so."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qfedit import registry
from qfedit.app import views
from qfedit.cpu import CpuTokens
from qfedit.facts import write_jsonl

from .conftest import ONLY_PRODUCTION_DB, Cluster, fact
from .test_embedded import _unconfigured_env


def _submit(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "batch", "submit", "--model", "tiny"],
        env={**cluster.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@ONLY_PRODUCTION_DB
def test_batch_submit_says_which_workers_listen(cluster: Cluster) -> None:
    cluster.add_model("tiny", [fact(i) for i in range(2)])
    # Nobody consumes the queues yet: the batch is queued, and the user is told it will wait.
    alone = _submit(cluster)
    assert alone.returncode == 0, alone.stderr
    assert "queued on 'default'" in alone.stdout and "no worker seen" in alone.stdout
    worker = cluster.start_worker("w1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with cluster.sessions() as session:
            if [w.hostname for w in registry.live_workers(session, 10.0)] == ["w1@test"]:
                break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no heartbeat from the worker:\n{cluster.dump()}")
    cluster.add_model("other", [fact(5)])  # the worker runs tiny's batch meanwhile
    listened = subprocess.run(
        [sys.executable, "-m", "cli", "batch", "submit", "--model", "other"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listened.returncode == 0, listened.stderr
    assert "workers listening: w1@test" in listened.stdout and "no worker" not in listened.stdout
    # A stopped worker takes its row with it.
    cluster.stop_workers()
    assert worker.returncode is not None
    with cluster.sessions() as session:
        assert registry.live_workers(session, 10.0) == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_api_on_the_embedded_default_runs_what_is_posted(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    token = "t" * 20 + "0123456789abcdef"
    env = {
        **_unconfigured_env(),
        "QFEDIT_API_TOKENS": json.dumps({"ci": {"token": token, "scope": "write"}}),
    }
    write_jsonl([fact(i) for i in range(2)], tmp_path / "facts.jsonl")
    for step in (
        ("model", "add", "tiny", str(tiny_model_dirs["qwen2"]), "--layer", "1", "--rule", "seed"),
        ("model", "configure", "tiny", "--set", "unteachable=include"),
        ("import", "facts.jsonl", "--model", "tiny"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "cli", *step],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(method: str, path: str, body: object = None) -> dict[str, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                call("GET", "/healthz")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        batch = call("POST", "/v1/models/tiny/batches", {})
        deadline = time.monotonic() + 180
        while (state := call("GET", f"/v1/batches/{batch['id']}"))["status"] not in ("published", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(1)
        assert state["status"] == "published", state
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=60)
    assert "a worker child runs the posted batches" in output
    assert (tmp_path / "qfedit-data" / "worker.log").is_file()


@pytest.mark.backends("postgresql")
def test_a_batch_waiting_for_cores_says_so_in_its_status(cluster: Cluster) -> None:
    # The attack: a newcomer's batch waited 5 minutes for cores that another installation's
    # workers held, and nothing in its status said so.
    cluster.add_model("tiny", [fact(i) for i in range(2)])
    tokens = CpuTokens(cluster.root / "data" / "cpu-tokens")  # the deployment's own folder
    with tokens.hold(tokens.cores):  # another task holds every core
        cluster.start_worker("a")
        batch_id = cluster.submit("tiny")
        deadline = time.monotonic() + 120
        while True:
            with cluster.sessions() as session:
                waiting = views.batch_out(session, registry.get_batch(session, batch_id)).waiting
            if waiting is not None:
                break
            assert time.monotonic() < deadline, f"the batch never said it waits:\n{cluster.dump()}"
            time.sleep(0.3)
        assert "for free CPU cores" in waiting and str(tokens.folder) in waiting
        shown = subprocess.run(
            [sys.executable, "-m", "cli", "batch", "status", str(batch_id), "--json"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert json.loads(shown.stdout)["waiting"] == waiting, shown.stderr
    batch = cluster.wait(batch_id, timeout=150)
    assert batch.status.value == "published", batch.error
    assert batch.waiting is None
