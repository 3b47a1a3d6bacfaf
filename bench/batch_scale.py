"""Batches of 1,000 to 30,000 facts end to end through the queue: wall time, facts/s and each
worker's peak resident memory (prints a table).

    python bench/batch_scale.py                       # 1,000 and 10,000 facts, 1 worker
    python bench/batch_scale.py --facts 1000 10000 30000 --workers 1

The facts are demo edits of a larger demo world (`build_world(n_unknown=...)`: the trained and
partly known companies are the demo model's own, the extra companies are new to it), so they are
facts the model does not know, as the demo's edits are. Each size runs on fresh worker
processes (`bench/queue_overhead.run_pipeline`: Redis, PostgreSQL, the local store, demo
settings), so a worker's peak RSS (VmHWM, its whole life: warm-up batch, capture shards, spread
solve, evaluation, publish) belongs to that size alone.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from queue_overhead import run_pipeline
from rich.console import Console
from rich.table import Table

from qfedit.demo.datasets import edit_facts
from qfedit.demo.world import RELATIONS, build_world
from qfedit.facts import Fact


def corpus(size: int) -> list[Fact]:
    """A warm-up fact and `size` facts to edit, none of which the demo model knows."""
    unknown = 180
    while True:
        facts = edit_facts(build_world(n_unknown=unknown))
        if len(facts) > size:
            return facts[: size + 1]
        unknown += (size + 1 - len(facts)) // len(RELATIONS) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--worker-threads", choices=["split", "all"], default="split")
    args = parser.parse_args()
    console = Console(width=160)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.facts:
            folder = Path(tmp) / f"n{size}"
            folder.mkdir()
            timing = run_pipeline(args, args.workers, folder, corpus(size))
            console.print(f"{size} facts: {timing}", style="dim")
            rows.append((size, timing))
    table = Table(
        title=f"One batch through Redis, PostgreSQL, the store and {args.workers} worker(s), demo settings"
    )
    for column in ("facts", "wall s", "facts/s", "capture s", "peak RSS per worker, MiB"):
        table.add_column(column, justify="right")
    for size, timing in rows:
        table.add_row(
            f"{size:,}",
            f"{timing['wall']:.0f}",
            f"{size / timing['wall']:.1f}",
            f"{timing['capture']:.0f}",
            f"{timing['peak_rss_mib']:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
