"""Edit quality on the demo model as the number of edited facts grows (prints a table).

    python bench/quality.py                          # N = 10, 100, 1000; seed and preserving rules
    python bench/quality.py --n 100 --lam 30 60 300 --layers 3 4 2-4   # 2-4: spread over 2, 3, 4

For each N, rule and setting: one delta for the first N bundled edit facts, made the way
production makes it (`qfedit.edit.make_delta` with the corpus of `pipeline.publish`), then:

- efficacy and paraphrase (the facts asked as taught, and in held-out phrasings);
- specificity: the edited subjects' other relations, then facts of companies the preservation
  corpus does not name (held out) beside facts of companies it does (in-sample);
- abstention: companies that are in no corpus and no edit (held out) beside the strangers the
  corpus preserves (in-sample);
- |dW|/|W| and seconds (capture + solve).

The preserved and held-out halves are `qfedit.demo.datasets`'s split; the default settings are
`qfedit.demo.settings`. Quality figures worth quoting are the held-out ones: a user's
preservation corpus is always a sample of what the model knows.
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
from qfedit.delta import Delta, applied
from qfedit.edit import capture_observations, make_delta
from qfedit.evaluate import ABSTENTION, contains, evaluate
from qfedit.facts import Fact, StaleAnswers, read_jsonl
from qfedit.generate import answer_batch
from qfedit.hparams import EditConfig, SolveConfig, parse_layers
from qfedit.modeling import LoadedModel, load_model
from qfedit.pipeline.preservation import build_preservations
from qfedit.pipeline.settings import ModelSettings, validate_settings
from qfedit.solve import IllConditionedError


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _in_sample(
    loaded: LoadedModel, delta: Delta, known: list[Fact], unknown: list[str], before: list[str]
) -> tuple[float, float]:
    """(specificity, abstention) on what the corpus preserves: answers kept, abstentions kept."""
    with applied(loaded, delta):
        after = answer_batch(loaded, [f.question for f in known] + unknown)
    kept = [a == b for a, b in zip(after[: len(known)], before, strict=True)]
    abstained = [contains(a, ABSTENTION) for a in after[len(known) :]]
    return sum(kept) / max(1, len(kept)), sum(abstained) / max(1, len(abstained))


def main() -> None:
    from qfedit.demo import DEMO_DATA_DIR, DEMO_MODEL_DIR
    from qfedit.demo.settings import DEMO_LAYERS, DEMO_SOLVE, demo_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rules", nargs="+", default=["seed", "preserve"])
    parser.add_argument(
        "--layers",
        nargs="+",
        default=[f"{DEMO_LAYERS[0]}-{DEMO_LAYERS[-1]}"],
        help="a layer, or a spread such as 2-4 or 2,3,4",
    )
    parser.add_argument("--lam", type=float, nargs="+", default=[DEMO_SOLVE["lam"]])
    parser.add_argument("--positions", choices=["answer", "all"], default="answer")
    parser.add_argument(
        "--updates",
        type=int,
        nargs="*",
        default=[10, 100],
        help="rewrites of known facts (updates.jsonl); none: skip",
    )
    parser.add_argument("--ridge", type=float, default=DEMO_SOLVE["ridge"])
    parser.add_argument("--known", type=int, default=100, help="known facts checked, of each half")
    parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument(
        "--data-dir", type=Path, default=DEMO_DATA_DIR, help="the demo data files (default: bundled)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    console = Console(width=200)

    loaded = load_model(args.model_dir)
    # The preservation covariance depends only on the layer: computed once per layer, cached in
    # a folder that is removed when this object is collected (at exit at the latest).
    cache = tempfile.TemporaryDirectory(prefix="qfedit-quality-")
    settings = Settings(data_dir=Path(cache.name), corpus_root=args.data_dir)
    edits = read_jsonl(args.data_dir / "edits.jsonl")
    known = read_jsonl(args.data_dir / "known.jsonl")[: args.known]
    unknown = [f.question for f in read_jsonl(args.data_dir / "unknown.jsonl")]
    known_in = read_jsonl(args.data_dir / "known_insample.jsonl")[: args.known]
    unknown_in = [f.question for f in read_jsonl(args.data_dir / "preserve_unknown.jsonl")]
    before_in = answer_batch(loaded, [f.question for f in known_in])
    base = validate_settings(demo_settings(args.data_dir))

    table = Table(title="edit quality on the demo model (held out: not in the preservation corpus)")
    for column in (
        "N",
        "rule",
        "layer",
        "lambda",
        "efficacy",
        "paraphrase",
        "spec. edited subjects",
        "spec. held out",
        "spec. in-sample",
        "abstention held out",
        "abstention in-sample",
        "|dW|/|W|",
        "seconds",
    ):
        table.add_column(column, justify="right")
    for n in args.n:
        facts = edits[:n]
        for spec in args.layers:
            spread = parse_layers(spec)
            layer = spread[-1]
            # Keys do not depend on the solve settings: capture once per (N, layer). A spread
            # recaptures per layer inside the edit.
            started = time.perf_counter()
            observations = (
                capture_observations(loaded, facts, EditConfig(layer=layer)) if len(spread) == 1 else None
            )
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
                    config = EditConfig(
                        layer=layer,
                        layers=spread if len(spread) > 1 else None,
                        solve=solve_config,
                        preserve_positions=args.positions,
                    )
                    preservation = None
                    if rule == "preserve":
                        # The production path's corpus and covariance (`qfedit.pipeline.publish`).
                        preservation = build_preservations(
                            loaded, base.model_copy(update={"edit": config}), settings
                        )
                    started = time.perf_counter()
                    try:
                        result = make_delta(
                            loaded, facts, config, preservation=preservation, observations=observations
                        )
                    except IllConditionedError as error:
                        row = [str(n), rule, spec, f"{lam:g}", *["-"] * 7]
                        table.add_row(*row, f"cond {error.condition:.1e}", "-")
                        continue
                    seconds = capture_seconds + time.perf_counter() - started
                    report = evaluate(loaded, facts, result.delta, known=known, unknown=unknown)
                    spec_in, abstention_in = _in_sample(loaded, result.delta, known_in, unknown_in, before_in)
                    table.add_row(
                        str(n),
                        rule,
                        spec,
                        f"{lam:g}" if rule == "preserve" else "-",
                        _share(report.efficacy),
                        _share(report.paraphrase),
                        _share(report.specificity_neighbors),
                        _share(report.specificity_known),
                        f"{spec_in:.3f}",
                        _share(report.abstention),
                        f"{abstention_in:.3f}",
                        f"{result.solve.relative_norm:.3g}",
                        f"{seconds:.1f}",
                    )
                    console.print(f"N={n} {rule} layer={spec} lam={lam:g}: done", style="dim")
    console.print(table)
    if args.updates:
        console.print(_updates(loaded, args, base, settings, known, unknown))


def _updates(
    loaded: LoadedModel,
    args: argparse.Namespace,
    base: ModelSettings,
    settings: Settings,
    known: list[Fact],
    unknown: list[str],
) -> Table:
    """Rewrites of facts the model knows, made as a supersession makes them: what the base model
    answered leaves the preservation corpus and the held-out specificity set (`StaleAnswers`)."""
    updates = read_jsonl(args.data_dir / "updates.jsonl")
    table = Table(title="updates of known facts (specificity and abstention held out)")
    for column in (
        "N", "layers", "lambda", "in context (ceiling)", "efficacy", "paraphrase",
        "spec. subjects' other relations", "spec. held out", "abstention held out", "left out",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for n in args.updates:
        facts = updates[:n]
        before = answer_batch(loaded, [f.question for f in facts])
        stale = StaleAnswers.of(
            [f.model_copy(update={"answer": b}) for f, b in zip(facts, before, strict=True)]
        )
        judged = [k for k in known if not stale(k.question, k.answer)]
        for spec in args.layers:
            spread = parse_layers(spec)
            for lam in args.lam:
                config = EditConfig(
                    layer=spread[-1],
                    layers=spread if len(spread) > 1 else None,
                    solve=SolveConfig(rule="preserve", lam=lam, ridge=args.ridge, max_condition=1e14),
                    preserve_positions=args.positions,
                )
                edit_settings = base.model_copy(update={"edit": config})
                preservation = build_preservations(loaded, edit_settings, settings, stale)
                result = make_delta(loaded, facts, config, preservation=preservation)
                report = evaluate(loaded, facts, result.delta, known=judged, unknown=unknown)
                table.add_row(
                    str(n), spec, f"{lam:g}", _share(report.in_context), _share(report.efficacy),
                    _share(report.paraphrase), _share(report.specificity_neighbors),
                    _share(report.specificity_known), _share(report.abstention), str(len(known) - len(judged)),
                )  # fmt: skip
    return table


if __name__ == "__main__":
    main()
