"""Edit quality on a real pretrained chat model, on real benchmark records (prints a table).

    python bench/real_quality.py --n 20 --seed 1                     # SmolLM2, zsRE, the preset
    python bench/real_quality.py --n 20 --seed 1 --layers 24 29 20-29 --lam 10 100 --target answer teacher
    python bench/real_quality.py --write-corpus qfedit/data/smollm2   # the preset's corpus files

The protocol (`qfedit.realdata`): zsRE's records are split once into a preservation part, a known
part and an edit pool. The preservation corpus is the model's own greedy answers to the Natural
Questions of the preservation part; edits are drawn from the pool by `--seed` (tune on one seed,
report another); specificity is judged on the known part's questions and on the edited records'
own locality questions, which no corpus and no tuning run contains (held out):

- read from context: the teachable ceiling (greedy answer with the fact as system message contains
  the new answer), and efficacy also as a share of the teachable facts;
- efficacy / paraphrase: the greedy answer without context contains the new answer;
- still right: known questions the model answered right (contains the reference) still are;
- unchanged: greedy answers to the known and locality questions identical to the base model's;
- CounterFact's probability scores (records that name the old answer, `--data counterfact`):
  rephrasings where log p(new answer) beats log p(old answer), and neighbourhood prompts (held
  out) where log p(their true answer) still beats log p(new answer);
- seconds per 100 edits (capture and solve, on this machine).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peers import PeerConfig, peer_delta
from rich.console import Console
from rich.table import Table

from qfedit.config import get_settings
from qfedit.covariance import compute_covariances, transcript
from qfedit.delta import Delta, applied
from qfedit.edit import make_delta, preservations_for
from qfedit.evaluate import answer_logprobs, contains
from qfedit.facts import Fact
from qfedit.generate import answer_batch
from qfedit.gguf_model import convert_gguf, packaged_gguf
from qfedit.hparams import EditConfig, SolveConfig, parse_layers
from qfedit.modeling import LoadedModel, load_model
from qfedit.presets import PRESETS, preset
from qfedit.realdata import draw, locality_questions, protocol_split, record_fact, records
from qfedit.teachable import read_with_context


@dataclass
class Row:
    method: str
    teachable: int
    n: int
    efficacy: float
    efficacy_teachable: float
    paraphrase: float
    still_right: float
    unchanged: float
    seconds_per_100: float | None
    rephrase_score: float | None = None
    neighbourhood_score: float | None = None


def _share(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


@dataclass(frozen=True)
class HeldOut:
    """What an edit must leave alone, none of it in the corpus or a tuning run: world facts the
    base model states right, and questions whose greedy answers must not change."""

    world: list[tuple[str, str]]  # (question, answer it states)
    questions: list[str]
    before: list[str]


def held_out(loaded: LoadedModel, world_file: Path | None, nq: int, facts: Sequence[Fact]) -> HeldOut:
    lines = world_file.read_text().splitlines() if world_file is not None else []
    world = [(r["question"], r["answer"]) for r in map(json.loads, lines)]
    split = protocol_split("zsre")
    questions = [q for q, _ in locality_questions(split.known[:nq])]
    questions += [n.question for f in facts for n in f.neighbors]
    return HeldOut(world, questions, answer_batch(loaded, questions))


@dataclass(frozen=True)
class Rivals:
    """CounterFact's probability scores: on each rephrasing, is the new answer likelier than the
    old one; on each neighbourhood prompt, is its true answer still likelier than the new one."""

    rephrased: list[tuple[str, str, str]]  # (rephrasing, new answer, old answer)
    neighbours: list[tuple[str, str, str]]  # (neighbour's prompt, its true answer, the new answer)

    def scores(self, loaded: LoadedModel) -> tuple[float | None, float | None]:
        shares: list[float | None] = []
        for triples in (self.rephrased, self.neighbours):
            if not triples:
                shares.append(None)
                continue
            questions = [q for q, _, _ in triples]
            first = answer_logprobs(loaded, questions, [a for _, a, _ in triples])
            second = answer_logprobs(loaded, questions, [b for _, _, b in triples])
            shares.append(_share([x > y for x, y in zip(first, second, strict=True)]))
        return shares[0], shares[1]


def rivals(data: Sequence[dict[str, object]], facts: Sequence[Fact]) -> Rivals:
    """The rival answers of records that name the old one (CounterFact's `ground_truth`)."""
    rephrased, neighbours = [], []
    for record, fact in zip(data, facts, strict=True):
        old = record.get("ground_truth")
        if not isinstance(old, str):
            continue
        rephrased += [(p, fact.answer, old) for p in fact.paraphrases]
        neighbours += [(n.question, n.answer, fact.answer) for n in fact.neighbors]
    return Rivals(rephrased, neighbours)


def judge(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    teachable: Sequence[bool],
    delta: Delta | None,
    kept: HeldOut,
    method: str,
    seconds: float | None,
    rival: Rivals | None = None,
) -> Row:
    paraphrased = [(f, p) for f in facts for p in f.paraphrases]
    with applied(loaded, delta):
        rephrase_score, neighbourhood_score = rival.scores(loaded) if rival is not None else (None, None)
        answers = answer_batch(
            loaded,
            [f.question for f in facts]
            + [p for _, p in paraphrased]
            + [q for q, _ in kept.world]
            + kept.questions,
        )
    edited, rest = answers[: len(facts)], answers[len(facts) :]
    rephrased, rest = rest[: len(paraphrased)], rest[len(paraphrased) :]
    world_after, after = rest[: len(kept.world)], rest[len(kept.world) :]
    hits = [contains(a, f.answer) for a, f in zip(edited, facts, strict=True)]
    return Row(
        method=method,
        teachable=sum(teachable),
        n=len(facts),
        efficacy=_share(hits),
        efficacy_teachable=_share([h for h, t in zip(hits, teachable, strict=True) if t]),
        paraphrase=_share([contains(a, f.answer) for a, (f, _) in zip(rephrased, paraphrased, strict=True)]),
        still_right=_share([contains(a, r) for a, (_, r) in zip(world_after, kept.world, strict=True)]),
        unchanged=_share([a == b for a, b in zip(after, kept.before, strict=True)]),
        seconds_per_100=None if seconds is None else 100 * seconds / len(facts),
        rephrase_score=rephrase_score,
        neighbourhood_score=neighbourhood_score,
    )


def in_context_row(loaded: LoadedModel, facts: Sequence[Fact], teachable: Sequence[bool]) -> Row:
    """Retrieval's answer: the fact in the system message, for the fact and its rephrasings;
    other questions are asked as they are (nothing retrieved for them)."""
    paraphrased = [(f, p) for f in facts for p in f.paraphrases]
    rephrased = answer_batch(loaded, [p for _, p in paraphrased], [f.context for f, _ in paraphrased])
    return Row(
        "in context (retrieval)",
        sum(teachable),
        len(facts),
        _share(teachable),
        1.0,
        _share([contains(a, f.answer) for a, (f, _) in zip(rephrased, paraphrased, strict=True)]),
        1.0,
        1.0,
        None,
    )


def write_corpus(loaded: LoadedModel, folder: Path, n_questions: int = 400, n_known: int = 600) -> None:
    """The preset's files: the model's own answers to the questions of zsRE's preservation part
    (the corpus), and the CounterFact known part's facts it states right (held-out world facts)."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = [q for q, _ in locality_questions(protocol_split("zsre").preserve[:n_questions])]
    own = answer_batch(loaded, questions)
    with (folder / "preserve.jsonl").open("w", encoding="utf-8") as out:
        for question, said in zip(questions, own, strict=True):
            out.write(json.dumps({"question": question, "answer": said}, ensure_ascii=False) + "\n")
    counterfact = records("counterfact")
    world = [counterfact[i] for i in protocol_split("counterfact").known[:n_known]]
    stated = answer_batch(loaded, [r["prompt"] for r in world])
    right = 0
    with (folder / "known.jsonl").open("w", encoding="utf-8") as out:
        for record, answer in zip(world, stated, strict=True):
            if contains(answer, record["ground_truth"]):
                right += 1
                fact = {"question": record["prompt"], "answer": record["ground_truth"], "context": answer}
                out.write(json.dumps(fact, ensure_ascii=False) + "\n")
    print(
        f"wrote {folder}/preserve.jsonl ({len(questions)}) and known.jsonl ({right} of {len(world)})",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help="a preset, a packaged GGUF model (gemma3-270m) or a model directory",
    )
    parser.add_argument("--data", choices=["zsre", "counterfact"], default="zsre")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="the draw of edited records")
    parser.add_argument(
        "--nq", type=int, default=100, help="held-out NQ questions judged for unchanged answers"
    )
    parser.add_argument("--layers", nargs="*", default=None, help="e.g. 29 24 20-29 (default: the preset's)")
    parser.add_argument("--lam", nargs="*", type=float, default=None)
    parser.add_argument("--rule", choices=["seed", "preserve"], default=None)
    parser.add_argument("--target", nargs="*", choices=["answer", "teacher"], default=None)
    parser.add_argument(
        "--positions", nargs="*", choices=["answer", "all"], default=None, help="preserved positions"
    )
    parser.add_argument(
        "--target-words",
        nargs="*",
        choices=["all", "divergent"],
        default=None,
        help="the teacher's words targeted",
    )
    parser.add_argument(
        "--span",
        nargs="*",
        type=int,
        default=None,
        help="target span: rival tokens per side whose logit gaps are the target (0: the whole output)",
    )
    parser.add_argument(
        "--margin",
        nargs="*",
        type=float,
        default=None,
        help="target margin: logits by which a position already settled is left alone (-1: none)",
    )
    parser.add_argument(
        "--phrasings",
        nargs="*",
        type=int,
        default=None,
        help="the model's own phrasings of each question taught beside it (0: none)",
    )
    parser.add_argument("--all-facts", action="store_true", help="edit unteachable facts too")
    parser.add_argument("--peers", nargs="*", choices=["memit", "alphaedit"], default=[])
    parser.add_argument("--peer-layers", default="4-8", help="MEMIT's and AlphaEdit's layer range")
    parser.add_argument("--write-corpus", type=Path, default=None)
    parser.add_argument("--corpus-questions", type=int, default=400, help="with --write-corpus")
    parser.add_argument("--known-records", type=int, default=600, help="with --write-corpus")
    parser.add_argument(
        "--corpus", type=Path, default=None, help="a folder --write-corpus wrote (default: the preset's)"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=240)  # a log file is not a terminal: rows on one line each

    models_dir = get_settings().data_dir / "models"
    chosen = preset(args.model) if args.model in PRESETS else None
    if chosen is not None:
        model_dir = chosen.model_dir(models_dir)
    elif Path(args.model).is_dir():
        model_dir = Path(args.model)
    else:  # a packaged GGUF model, e.g. gemma3-270m
        model_dir = convert_gguf(packaged_gguf(args.model, models_dir), models_dir)
    loaded = load_model(model_dir)
    if args.write_corpus is not None:
        write_corpus(loaded, args.write_corpus, args.corpus_questions, args.known_records)
        return
    top = len(loaded.architecture.layer_list(loaded.model)) - 1
    defaults: dict[str, Any] = chosen.settings() if chosen is not None else {"edit": {"layer": top}}
    if args.corpus is not None:
        defaults["preservation_corpus"] = [str(args.corpus / "preserve.jsonl")]
        defaults["known_facts"] = str(args.corpus / "known.jsonl")
    edit_defaults = defaults["edit"]

    data = records(args.data)
    pool = protocol_split(args.data).edit_pool
    drawn = [data[i] for i in draw(pool, args.n, seed=args.seed)]
    facts = [record_fact(record, args.data) for record in drawn]
    rival = rivals(drawn, facts)
    readings = read_with_context(loaded, facts)
    teachable = [r.teachable for r in readings]
    known = defaults.get("known_facts")
    kept = held_out(loaded, Path(known) if known else None, args.nq, facts)
    edited = facts if args.all_facts else [f for f, t in zip(facts, teachable, strict=True) if t]
    corpus_files = [Path(p) for p in defaults.get("preservation_corpus", [])]
    preserve_texts = []
    for path in corpus_files:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            preserve_texts.append(transcript(loaded, record["question"], record["answer"]))

    rows = [
        judge(loaded, facts, teachable, None, kept, "base model", None, rival),
        in_context_row(loaded, facts, teachable),
    ]
    console.print(
        f"{args.data}, N = {args.n} (seed {args.seed}): {sum(teachable)} read from context; "
        f"{len(edited)} edited; corpus {len(preserve_texts)} transcripts",
        highlight=False,
    )
    layer_options = args.layers or [
        ",".join(map(str, edit_defaults.get("layers") or [edit_defaults["layer"]]))
    ]
    solve_defaults = edit_defaults.get("solve", {})
    for layers_text in layer_options:
        layers = parse_layers(layers_text)
        for target in args.target or [edit_defaults.get("target", "answer")]:
            for lam, positions, words, span, margin, phrasings in itertools.product(
                args.lam or [solve_defaults.get("lam", 1.0)],
                args.positions or [edit_defaults.get("preserve_positions", "answer")],
                args.target_words or [edit_defaults.get("target_words", "all")],
                args.span if args.span is not None else [edit_defaults.get("target_span", 0)],
                args.margin if args.margin is not None else [edit_defaults.get("target_margin")],
                args.phrasings if args.phrasings is not None else [edit_defaults.get("phrasings", 0)],
            ):
                rule = args.rule or solve_defaults.get("rule", "preserve")
                config = EditConfig.model_validate(
                    {
                        "layer": max(layers),
                        "layers": list(layers) if len(layers) > 1 else None,
                        "solve": SolveConfig(rule=rule, lam=lam, ridge=solve_defaults.get("ridge", 1e-2)),
                        "target": target,
                        "preserve_positions": positions,
                        "target_words": words,
                        "target_span": span,
                        "target_margin": None if margin is None or margin < 0 else margin,
                        "phrasings": phrasings,
                    }
                )
                started = time.perf_counter()
                preservation = (
                    preservations_for(loaded, config, preserve_texts, get_settings().cache_dir)
                    if rule == "preserve"
                    else None
                )
                covariance = time.perf_counter() - started
                started = time.perf_counter()
                result = make_delta(loaded, edited, config, preservation=preservation)
                seconds = time.perf_counter() - started
                label = f"qfedit {rule} {layers_text} λ {lam:g} {target} ({words}) span {span} margin {margin} phrasings {phrasings} {positions}"
                rows.append(judge(loaded, facts, teachable, result.delta, kept, label, seconds, rival))
                console.print(f"{label}: edit {seconds:.1f}s (covariance {covariance:.1f}s)", highlight=False)
    if args.peers:
        peer_layers = parse_layers(args.peer_layers)
        found = compute_covariances(
            loaded, preserve_texts, peer_layers, positions="all", cache_dir=get_settings().cache_dir
        )
        covariances = {layer: covariance for layer, (covariance, _) in found.items()}
        for method in args.peers:
            delta, seconds = peer_delta(loaded, edited, PeerConfig(method, peer_layers), covariances)
            label = f"{method} {args.peer_layers}"
            rows.append(judge(loaded, facts, teachable, delta, kept, label, seconds, rival))
            console.print(f"{label}: edit {seconds:.1f}s", highlight=False)
    table = Table(
        "method",
        "read from context",
        "efficacy",
        "efficacy (of teachable)",
        "paraphrase",
        "still right (held out)",
        "unchanged (held out)",
        "P(new)>P(old) rephrased",
        "P(true)>P(new) neighbours (held out)",
        "s / 100 edits",
        title=f"{model_dir.name}, {args.data} N = {args.n}, seed {args.seed}",
    )
    for row in rows:
        table.add_row(
            row.method,
            f"{row.teachable}/{row.n}",
            f"{row.efficacy:.2f}",
            f"{row.efficacy_teachable:.2f}",
            f"{row.paraphrase:.2f}",
            f"{row.still_right:.2f}",
            f"{row.unchanged:.2f}",
            "-" if row.rephrase_score is None else f"{row.rephrase_score:.2f}",
            "-" if row.neighbourhood_score is None else f"{row.neighbourhood_score:.2f}",
            "-" if row.seconds_per_100 is None else f"{row.seconds_per_100:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
