"""HTTP API rates: GET of a version (requests/s) and fact import through the API vs the library and CLI.

    python bench/api_rate.py [--facts 100000] [--seconds 10] [--concurrency 8] [--postgres URL]

For each database (a SQLite file, and a throwaway PostgreSQL schema) it imports the same
synthetic corpus three ways into fresh databases: the library call (`import_facts`), the CLI
(`qfedit import`, a subprocess, so process start counts), and `POST /v1/models/{m}/facts/import`
against `qfedit api` (uvicorn, 127.0.0.1 only, the body streamed from the file). Then it loads
`GET /v1/models/{m}/versions/1` from a bounded number of concurrent clients for a fixed time.
The issue's floor: the API import within 2x of the CLI's time. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).parent))
from import_rate import write_corpus

from qfedit import importing, registry
from qfedit.db import make_engine, migrate, session_factory

TOKEN = "bench-token-0123456789abcdefghijklmnop"
TOKENS = json.dumps({"bench": {"token": TOKEN, "scope": "admin"}})


def _prepare(url: str) -> None:
    """The schema at head (what `qfedit api` requires) and one registered model."""
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        with session_factory(engine)() as session:
            registry.add_model(session, name="bench", source="/bench", fingerprint="0" * 64, actor="bench")
            session.commit()
    finally:
        engine.dispose()


@contextmanager
def _database(kind: str, workdir: Path, admin_url: str) -> Iterator[str]:
    if kind == "SQLite":
        yield f"sqlite:///{workdir}/{uuid.uuid4().hex[:8]}.db"
        return
    schema = f"qfedit_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(admin_url)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{admin_url}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _env(url: str, workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "QFEDIT_DATABASE_URL": url,
        "QFEDIT_DATA_DIR": str(workdir / "data"),
        "QFEDIT_API_TOKENS": TOKENS,
        "QFEDIT_ACTOR": "bench",
    }


def library_import(url: str, corpus: Path) -> float:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            model = registry.get_model(session, "bench")
            start = time.perf_counter()
            importing.import_facts(session, corpus, model, actor="bench")
            return time.perf_counter() - start
    finally:
        engine.dispose()


def cli_import(url: str, corpus: Path, workdir: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cli", "import", str(corpus), "--model", "bench", "--json"],
        env=_env(url, workdir),
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def api_server(url: str, workdir: Path) -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qfedit",
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=_env(url, workdir),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("qfedit api did not start")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def api_import(base: str, corpus: Path) -> tuple[float, dict[str, object]]:
    def chunks() -> Iterator[bytes]:
        with corpus.open("rb") as handle:
            while block := handle.read(1 << 16):
                yield block

    start = time.perf_counter()
    response = httpx.post(
        f"{base}/v1/models/bench/facts/import",
        content=chunks(),
        params={"source": corpus.name},
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()


def _record_version(url: str, facts: int) -> None:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            model = registry.get_model(session, "bench")
            ids = [f.id for f in registry.list_facts(session, model=model, limit=facts)]
            registry.record_version(
                session, model=model, fact_ids=ids, created_by="bench", reason="bench",
                checkpoint=None, layer=None, rule=None,
            )  # fmt: skip
            session.commit()
    finally:
        engine.dispose()


def get_rate(base: str, seconds: float, concurrency: int) -> tuple[int, float, float, float]:
    """Requests, requests/s, p50 and p99 latency (ms) of GET version 1 from `concurrency` clients."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        mine: list[float] = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            while time.monotonic() < stop:
                start = time.perf_counter()
                response = session.get("/v1/models/bench/versions/1")
                mine.append(time.perf_counter() - start)
                if response.status_code != 200:
                    failures.append(response.status_code)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} GETs failed, e.g. status {failures[0]}")
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies), len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--facts", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the GET load")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent GET clients")
    parser.add_argument("--version-facts", type=int, default=1000, help="facts in the version fetched")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--backends", default="SQLite,PostgreSQL")
    args = parser.parse_args()

    imports = Table(
        "database",
        "path",
        "facts",
        "seconds",
        "facts/s",
        "vs library",
        "vs CLI",
        title=f"fact import, {args.facts:,} facts (jsonl)",
    )
    gets = Table(
        "database", "clients", "requests", "requests/s", "p50 ms", "p99 ms",
        title=f"GET /v1/models/{{m}}/versions/1 ({args.version_facts:,} facts), {args.seconds:g} s",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus = write_corpus(workdir, args.facts)["jsonl"]
        for kind in args.backends.split(","):
            timings: dict[str, float] = {}
            with _database(kind, workdir, args.postgres) as url:
                _prepare(url)
                timings["library"] = library_import(url, corpus)
            with _database(kind, workdir, args.postgres) as url:
                _prepare(url)
                timings["CLI (qfedit import)"] = cli_import(url, corpus, workdir)
            with _database(kind, workdir, args.postgres) as url:
                _prepare(url)
                with api_server(url, workdir) as base:
                    timings["API (POST, streamed)"], result = api_import(base, corpus)
                    if result["imported"] != args.facts:
                        raise RuntimeError(f"API imported {result['imported']}, not {args.facts}")
                    _record_version(url, args.version_facts)
                    count, rate, p50, p99 = get_rate(base, args.seconds, args.concurrency)
                    gets.add_row(
                        kind, str(args.concurrency), f"{count:,}", f"{rate:,.0f}", f"{p50:.1f}", f"{p99:.1f}"
                    )
            cli, library = timings["CLI (qfedit import)"], timings["library"]
            for path, seconds in timings.items():
                imports.add_row(
                    kind,
                    path,
                    f"{args.facts:,}",
                    f"{seconds:.2f}",
                    f"{args.facts / seconds:,.0f}",
                    f"{seconds / library:.2f}x",
                    f"{seconds / cli:.2f}x",
                )
    console = Console()
    console.print(imports)
    console.print(gets)


if __name__ == "__main__":
    main()
