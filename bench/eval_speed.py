"""Evaluation time on the demo model, one question at a time against padded batches (prints a table).

    python bench/eval_speed.py [--facts 50] [--known 100] [--unknown 100] [--batch-sizes 1 8 32 64]

`qfedit.evaluate.evaluate` generates greedy answers for the edited facts (with and without their
context), their paraphrases, the known facts and the abstention probes, and scores the answers'
log-probabilities. Each batch size's answers are checked equal to batch size 1's.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH, KNOWN_PATH, UNKNOWN_PATH
from qfedit.evaluate import evaluate
from qfedit.facts import read_jsonl
from qfedit.modeling import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=50)
    parser.add_argument("--known", type=int, default=100)
    parser.add_argument("--unknown", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(DEMO_MODEL_DIR)
    facts = read_jsonl(EDITS_PATH)[: args.facts]
    known = read_jsonl(KNOWN_PATH)[: args.known]
    unknown = [f.question for f in read_jsonl(UNKNOWN_PATH)[: args.unknown]]
    questions = 2 * len(facts) + sum(len(f.paraphrases) for f in facts) + len(known) + 2 * len(unknown)
    table = Table(title=f"evaluation, demo model, {questions} generations + {2 * len(facts)} scorings")
    for column in ("batch size", "seconds", "questions/s", "speed-up", "same answers as 1"):
        table.add_column(column, justify="right")
    reference, first = None, None
    for size in args.batch_sizes:
        start = time.perf_counter()
        report = evaluate(loaded, facts, known=known, unknown=unknown, batch_size=size)
        seconds = time.perf_counter() - start
        if reference is None:
            reference, first = report.details, seconds
        assert first is not None
        table.add_row(
            str(size),
            f"{seconds:.2f}",
            f"{questions / seconds:.1f}",
            f"{first / seconds:.1f}x",
            "yes" if report.details == reference else "NO",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
