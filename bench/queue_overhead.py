"""End to end through Redis, PostgreSQL and worker processes vs the engine alone (prints tables).

    python bench/queue_overhead.py                 # 1,000 demo facts, 1 and 2 workers
    python bench/queue_overhead.py --facts 200 --workers 1

For each worker count: a fresh PostgreSQL schema, a Redis server of its own, `qfedit worker`
processes (warmed with a one-fact batch, which also computes the preservation covariance), then
one batch of N facts timed from submit to published. The engine does the same work in one
process (capture, statistics, solve, evaluation; the covariance from the same cache). Overhead
is the wall time above the engine's.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from qfedit import registry
from qfedit.config import Settings
from qfedit.db import make_engine, migrate, session_factory
from qfedit.edit import capture_observations, make_delta
from qfedit.evaluate import evaluate
from qfedit.facts import Fact, read_jsonl, write_jsonl
from qfedit.importing import import_facts
from qfedit.modeling import load_model, weights_fingerprint
from qfedit.pipeline import lifecycle, submit

POSTGRES = os.environ.get("QFEDIT_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory of a process and its children (VmHWM, Linux), in MiB."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def run_pipeline(
    args: argparse.Namespace, workers: int, root: Path, facts: list[Fact] | None = None
) -> dict[str, float]:
    """One batch of `facts` (default: the first `args.facts` demo edits) through the queue, after
    a one-fact warm-up batch: wall and capture seconds, and the workers' largest peak RSS."""
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH
    from qfedit.demo.settings import demo_settings
    from worker.client import enqueue_batch

    schema = f"qfedit_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(POSTGRES)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    port = _port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "QFEDIT_DATABASE_URL": url,
        "QFEDIT_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "QFEDIT_DATA_DIR": str(root / "data"),
        "QFEDIT_TORCH_THREADS": str(
            max(1, (os.cpu_count() or 1) // workers)
            if args.worker_threads == "split"
            else os.cpu_count() or 1
        ),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    settings = Settings(database_url=url, broker_url=env["QFEDIT_BROKER_URL"], data_dir=root / "data")
    procs: list[subprocess.Popen[bytes]] = []
    engine = make_engine(url)
    try:
        time.sleep(0.5)
        migrate.upgrade(engine)
        sessions = session_factory(engine)
        if facts is None:
            facts = read_jsonl(EDITS_PATH)[: args.facts + 1]
        warm, timed = root / "warm.jsonl", root / "timed.jsonl"
        write_jsonl(facts[:1], warm)
        write_jsonl(facts[1:], timed)
        with sessions() as session:
            model = registry.add_model(
                session,
                name="demo",
                source=str(DEMO_MODEL_DIR),
                fingerprint=weights_fingerprint(DEMO_MODEL_DIR),
                actor="bench",
            )
            model.settings = {
                **demo_settings(),
                "shard_size": args.shard_size,
            }
            session.commit()
        log = (root / f"workers-{workers}.log").open("ab")
        for index in range(workers):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cli",
                        "worker",
                        "--hostname",
                        f"w{index}@bench",
                        "--loglevel",
                        "WARNING",
                    ],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )

        def batch_of(path: Path) -> tuple[float, int]:
            with sessions() as session:
                model = registry.get_model(session, "demo")
                import_facts(session, path, model, actor="bench")
                batch = submit.submit_batch(
                    session, model=model, fact_ids=None, requested_by="bench", app=settings
                )
                session.commit()
                batch_id = batch.id
            started = time.perf_counter()
            enqueue_batch(batch_id, settings)
            while True:
                with sessions() as session:
                    status = registry.get_batch(session, batch_id).status
                if status in lifecycle.FINAL:
                    break
                if any(proc.poll() is not None for proc in procs):
                    raise RuntimeError(f"a worker exited; see {root}")
                time.sleep(0.5)  # a tight poll steals CPU from the worker on 2 cores
            if status.value != "published":
                raise RuntimeError(f"batch {batch_id} {status.value}; see {root}")
            return time.perf_counter() - started, batch_id

        batch_of(warm)
        wall, batch_id = batch_of(timed)
        with engine.connect() as connection:
            shards = connection.execute(
                text("SELECT min(updated_at), max(updated_at) FROM batch_shards WHERE batch_id = :b"),
                {"b": batch_id},
            ).one()
            started = connection.execute(
                text("SELECT started_at FROM batches WHERE id = :b"), {"b": batch_id}
            ).scalar_one()
        capture_span = (shards[1] - started).total_seconds()
        peak = max(peak_rss_mib(proc.pid) for proc in procs)
        return {"wall": wall, "capture": capture_span, "peak_rss_mib": peak}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        redis.terminate()
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def run_engine(args: argparse.Namespace, cache_dir: Path) -> dict[str, float]:
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH, KNOWN_PATH, UNKNOWN_PATH
    from qfedit.demo.settings import demo_settings
    from qfedit.pipeline.preservation import build_preservations
    from qfedit.pipeline.settings import validate_settings

    config = validate_settings(demo_settings())
    loaded = load_model(DEMO_MODEL_DIR)
    facts = read_jsonl(EDITS_PATH)[1 : args.facts + 1]
    started = time.perf_counter()
    preservation = build_preservations(loaded, config, Settings(data_dir=cache_dir))
    if config.edit.layers:
        # A spread captures inside the solve, layer after layer (`qfedit.edit.spread_delta`).
        result = make_delta(loaded, facts, config.edit, preservation=preservation)
        captured = started + result.capture_seconds
    else:
        observations = capture_observations(
            loaded, facts, config.edit, shard_size=args.shard_size, batch_size=config.capture_batch_size
        )
        captured = time.perf_counter()
        # The engine's own path, as `qfedit edit` runs it, from the capture above.
        result = make_delta(loaded, facts, config.edit, preservation=preservation, observations=observations)
    delta = result.delta
    known = read_jsonl(KNOWN_PATH)[: config.known_sample]
    unknown = [f.question for f in read_jsonl(UNKNOWN_PATH)]
    evaluate(loaded, facts, delta, known=known, unknown=unknown)
    return {"total": time.perf_counter() - started, "capture": captured - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument(
        "--worker-threads",
        choices=["split", "all"],
        default="split",
        help="each worker's torch threads: the cores split between the workers, or every core each",
    )
    args = parser.parse_args()
    console = Console(width=180)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for workers in args.workers:
            folder = root / f"w{workers}"
            folder.mkdir()
            rows.append((workers, run_pipeline(args, workers, folder)))
            console.print(f"{workers} worker(s): {rows[-1][1]}", style="dim")
        engine = run_engine(args, root / f"w{args.workers[-1]}" / "data" / "cache")
    table = Table(
        title=f"{args.facts} demo facts: queue + PostgreSQL + store vs the engine in one process "
        f"(worker threads: {args.worker_threads})"
    )
    for column in ("run", "wall s", "capture s", "capture facts/s", "overhead vs engine"):
        table.add_column(column, justify="right")
    table.add_row(
        "engine, 1 process",
        f"{engine['total']:.1f}",
        f"{engine['capture']:.1f}",
        f"{args.facts / engine['capture']:.0f}",
        "-",
    )
    for workers, timing in rows:
        overhead = (timing["wall"] - engine["total"]) / engine["total"]
        table.add_row(
            f"queue, {workers} worker(s)",
            f"{timing['wall']:.1f}",
            f"{timing['capture']:.1f}",
            f"{args.facts / timing['capture']:.0f}",
            f"{overhead:+.0%}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
