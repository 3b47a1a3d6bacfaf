"""Import rate (facts/s) of `qfedit.importing.import_facts` into SQLite and PostgreSQL.

    python bench/import_rate.py [--facts 100000] [--postgres URL] [--profile]

Writes synthetic facts (jsonl and csv), imports each into a fresh database, and prints a table
with the CPU seconds of this process and, for a PostgreSQL server on this host, of its backend:
the two work side by side, so the larger bounds the rate. Issue 18 asks 50,000 facts/s for jsonl
into PostgreSQL. The PostgreSQL run uses a throwaway schema that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import os
import pstats
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.orm import Session

from qfedit import importing, registry
from qfedit.db import Base, make_engine, session_factory


def write_corpus(directory: Path, count: int) -> dict[str, Path]:
    jsonl, csv_path = directory / "synthetic.jsonl", directory / "synthetic.csv"
    with jsonl.open("w") as out_jsonl, csv_path.open("w", newline="") as out_csv:
        writer = csv.writer(out_csv)
        writer.writerow(["id", "subject", "question", "answer", "context", "paraphrases"])
        for i in range(count):
            subject = f"Entity {i}"
            record = {
                "id": f"syn-{i}",
                "subject": subject,
                "question": f"Where was {subject} founded?",
                "answer": f"City {i % 9973}",
                "context": f"{subject} was founded in City {i % 9973}.",
                "paraphrases": [f"{subject} has its origins in which city?"],
            }
            out_jsonl.write(json.dumps(record) + "\n")
            writer.writerow(
                [
                    *(record[k] for k in ("id", "subject", "question", "answer", "context")),
                    json.dumps(record["paraphrases"]),
                ]
            )
    return {"jsonl": jsonl, "csv": csv_path}


def _backend_cpu(session: Session) -> Callable[[], float | None]:
    """CPU seconds so far of the session's PostgreSQL backend, where /proc shows it (a local server)."""
    if session.get_bind().dialect.name != "postgresql":
        return lambda: None
    stat = Path(f"/proc/{session.scalar(text('SELECT pg_backend_pid()'))}/stat")
    session.commit()

    def seconds() -> float | None:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return seconds


def run_once(
    url: str, corpus: Path, profile: bool = False
) -> tuple[float, float, float | None, importing.ImportSummary]:
    """Wall seconds, this process's CPU seconds, the server backend's CPU seconds, the summary."""
    engine = make_engine(url)
    try:
        Base.metadata.create_all(engine)
        with session_factory(engine)() as session:
            model = registry.add_model(
                session, name="bench", source="/bench", fingerprint="0" * 64, actor="bench"
            )
            session.commit()
            server = _backend_cpu(session)
            profiler = cProfile.Profile() if profile else None
            start, cpu, server_start = time.perf_counter(), time.process_time(), server()
            if profiler is not None:
                profiler.enable()
            summary = importing.import_facts(session, corpus, model, actor="bench")
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            server_end = server()
            server_cpu = None if server_start is None or server_end is None else server_end - server_start
            if profiler is not None:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return elapsed, cpu, server_cpu, summary
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--facts", type=int, default=100_000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--profile", action="store_true", help="print where the PostgreSQL jsonl import spends its time"
    )
    args = parser.parse_args()

    table = Table(
        "database",
        "format",
        "facts",
        "seconds",
        "facts/s",
        "CPU s, this process",
        "CPU s, server",
        title=f"import rate, {args.facts:,} facts",
    )

    def add_row(
        database: str, fmt: str, run: tuple[float, float, float | None, importing.ImportSummary]
    ) -> None:
        elapsed, cpu, server_cpu, summary = run
        table.add_row(
            database,
            fmt,
            f"{summary.imported:,}",
            f"{elapsed:.2f}",
            f"{summary.imported / elapsed:,.0f}",
            f"{cpu:.2f}",
            "-" if server_cpu is None else f"{server_cpu:.2f}",
        )

    with tempfile.TemporaryDirectory() as tmp:
        corpora = write_corpus(Path(tmp), args.facts)
        admin = make_engine(args.postgres)
        for fmt, corpus in corpora.items():
            add_row("SQLite", fmt, run_once(f"sqlite:///{tmp}/bench-{fmt}.db", corpus))

            schema = f"qfedit_bench_{uuid.uuid4().hex[:8]}"
            with admin.begin() as connection:
                connection.execute(text(f"CREATE SCHEMA {schema}"))
            try:
                url = f"{args.postgres}?options=-csearch_path%3D{schema}"
                add_row("PostgreSQL", fmt, run_once(url, corpus, profile=args.profile and fmt == "jsonl"))
            finally:
                with admin.begin() as connection:
                    connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
    Console().print(table)


if __name__ == "__main__":
    main()
