"""Edit quality on the demo model as the number of edited facts grows (prints a table).

    python bench/quality.py                          # N = 10, 100, 1000; seed and preserving rules
    python bench/quality.py --n 100 --lam 0.1 1 10 --layers 2 3

For each N, rule and setting: one delta for the first N bundled edit facts, then efficacy,
paraphrase, specificity (the edited subjects' other relations, and other known facts),
abstention on unknown entities, |dW|/|W| and seconds (capture + solve). The default rule's
settings are `qfedit.demo.settings`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from qfedit.config import Settings
from qfedit.edit import capture_observations, make_delta
from qfedit.evaluate import evaluate
from qfedit.facts import read_jsonl
from qfedit.hparams import EditConfig, SolveConfig
from qfedit.modeling import load_model
from qfedit.pipeline.publish import build_preservation
from qfedit.pipeline.settings import validate_settings
from qfedit.solve import IllConditionedError


def main() -> None:
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH, KNOWN_PATH, PRESERVE_PATH, UNKNOWN_PATH
    from qfedit.demo.settings import DEMO_LAYER, DEMO_SOLVE, demo_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rules", nargs="+", default=["seed", "preserve"])
    parser.add_argument("--layers", type=int, nargs="+", default=[DEMO_LAYER])
    parser.add_argument("--lam", type=float, nargs="+", default=[DEMO_SOLVE["lam"]])
    parser.add_argument("--positions", choices=["answer", "all"], default="answer")
    parser.add_argument("--ridge", type=float, default=DEMO_SOLVE["ridge"])
    parser.add_argument("--known", type=int, default=100, help="known facts checked for specificity")
    parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="edits/known/preserve/unknown.jsonl (default: bundled)"
    )
    args = parser.parse_args()
    if args.data_dir is not None:
        EDITS_PATH, KNOWN_PATH, PRESERVE_PATH, UNKNOWN_PATH = (
            args.data_dir / f"{n}.jsonl" for n in ("edits", "known", "preserve", "unknown")
        )
    torch.manual_seed(0)
    console = Console(width=180)

    loaded = load_model(args.model_dir)
    # The preservation covariance depends only on the layer: computed once per layer, cached in
    # a folder that is removed when this object is collected (at exit at the latest).
    cache = tempfile.TemporaryDirectory(prefix="qfedit-quality-")
    cache_dir = Path(cache.name)
    edits = read_jsonl(EDITS_PATH)
    known = read_jsonl(KNOWN_PATH)[: args.known]
    unknown = [f.question for f in read_jsonl(UNKNOWN_PATH)]
    base = validate_settings(demo_settings(known=KNOWN_PATH, unknown=UNKNOWN_PATH, preserve=PRESERVE_PATH))

    table = Table(title="edit quality on the demo model")
    for column in (
        "N",
        "rule",
        "layer",
        "lambda",
        "efficacy",
        "paraphrase",
        "spec. subjects",
        "spec. known",
        "abstention",
        "|dW|/|W|",
        "seconds",
    ):
        table.add_column(column, justify="right")
    for n in args.n:
        facts = edits[:n]
        for layer in args.layers:
            # Keys do not depend on the solve settings: capture once per (N, layer).
            started = time.perf_counter()
            observations = capture_observations(loaded, facts, EditConfig(layer=layer))
            capture_seconds = time.perf_counter() - started
            for rule in args.rules:
                lams = args.lam if rule == "preserve" else [0.0]
                for lam in lams:
                    solve_config = SolveConfig(
                        rule=rule,
                        lam=lam if rule == "preserve" else 1.0,
                        ridge=args.ridge,
                        max_condition=1e14,
                    )
                    config = EditConfig(layer=layer, solve=solve_config, preserve_positions=args.positions)
                    preservation = None
                    if rule == "preserve":
                        # The production path's corpus and covariance (`qfedit.pipeline.publish`).
                        preservation = build_preservation(
                            loaded, base.model_copy(update={"edit": config}), Settings(data_dir=cache_dir)
                        )
                    started = time.perf_counter()
                    try:
                        result = make_delta(
                            loaded, facts, config, preservation=preservation, observations=observations
                        )
                    except IllConditionedError as error:
                        table.add_row(
                            str(n),
                            rule,
                            str(layer),
                            f"{lam:g}",
                            *["-"] * 5,
                            f"cond {error.condition:.1e}",
                            "-",
                        )
                        continue
                    seconds = capture_seconds + time.perf_counter() - started
                    report = evaluate(loaded, facts, result.delta, known=known, unknown=unknown)
                    table.add_row(
                        str(n),
                        rule,
                        str(layer),
                        f"{lam:g}" if rule == "preserve" else "-",
                        f"{report.efficacy:.3f}",
                        f"{report.paraphrase:.3f}",
                        f"{report.specificity_neighbors:.3f}",
                        f"{report.specificity_known:.3f}",
                        f"{report.abstention:.3f}",
                        f"{result.solve.relative_norm:.3g}",
                        f"{seconds:.1f}",
                    )
                    console.print(f"N={n} {rule} layer={layer} lam={lam:g}: done", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
