"""Engine commands: edit a local model directory, ask it questions."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from cli.app import app
from cli.common import errors, user_errors
from qfedit.errors import InvalidInputError

if TYPE_CHECKING:
    from rich.progress import TaskID

    from qfedit.covariance import CorpusText
    from qfedit.delta import Delta
    from qfedit.evaluate import EvalReport
    from qfedit.facts import Fact
    from qfedit.hparams import EditConfig
    from qfedit.modeling import LoadedModel
    from qfedit.pipeline.settings import ModelSettings
    from qfedit.solve import Preservation

console = Console()
err = Console(stderr=True)

ModelDir = Annotated[
    Path, typer.Argument(help="Local Hugging Face model directory.", exists=True, file_okay=False)
]
Dtype = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16, float16.")]
Device = Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda:0.")]
Target = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A local model directory, or a registered version: NAME@N or NAME@ALIAS (e.g. demo@production).",
    ),
]
ChatTemplate = Annotated[
    Path | None,
    typer.Option(help="Jinja chat template file, for a model whose tokenizer has none.", exists=True),
]


def quiet_transformers() -> None:
    """The CLI prints its own progress; transformers' loading bars would bury it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def fail(message: str) -> typer.Exit:
    from qfedit.errors import EXIT_CODES, ErrorCode

    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(EXIT_CODES[ErrorCode.INVALID])


def load(model_dir: Path, dtype: str, device: str, chat_template: Path | None = None) -> LoadedModel:
    quiet_transformers()
    from qfedit.modeling import load_model

    template = chat_template.read_text() if chat_template is not None else None
    if model_dir.is_file():
        from qfedit.config import get_settings
        from qfedit.gguf_model import convert_gguf

        # A GGUF file: converted once into the data folder, as `model add` does.
        model_dir = convert_gguf(model_dir, get_settings().data_dir / "models", progress=err.print)
    return load_model(model_dir, dtype=dtype, device=device, chat_template=template)


def load_target(
    target: str, delta: Path | None, dtype: str, device: str, chat_template: Path | None = None
) -> tuple[LoadedModel, Delta | None]:
    """The model and the change to apply: a directory and `--delta`, or a registered version
    (its base model from where it was registered, its delta from the checkpoint store)."""
    from qfedit.delta import Delta

    if Path(target).is_dir():
        return load(Path(target), dtype, device, chat_template), Delta.load(delta) if delta else None
    if "@" not in target:
        raise InvalidInputError(
            f"{target!r} is neither a model directory nor a version (NAME@N or NAME@ALIAS)", field="model"
        )
    if delta is not None:
        raise InvalidInputError(
            "--delta applies to a model directory; a version brings its own", field="delta"
        )
    from cli.common import in_session
    from qfedit import registry
    from qfedit.config import get_settings
    from qfedit.serving import load_version_delta
    from qfedit.store import store_from_settings

    def resolve(session: object) -> tuple[str, Delta | None]:
        version = registry.get_version(session, target)  # type: ignore[arg-type]
        return version.model.source, load_version_delta(store_from_settings(get_settings()), version)

    source, change = in_session(resolve)
    if not (Path(source) / "config.json").is_file():
        raise InvalidInputError(
            f"{target}: its base model is not at {source}, where it was registered", field="model"
        )
    # The delta names the base fingerprint it was solved for; applying it to other weights is refused.
    return load(Path(source), dtype, device, chat_template), change


def teachable_only(loaded: LoadedModel, facts: list[Fact], labels: list[str]) -> tuple[list[Fact], list[str]]:
    """The facts the model answers right with the fact in context, naming the others."""
    from qfedit.teachable import read_with_context

    readings = read_with_context(loaded, facts)
    kept = [i for i, reading in enumerate(readings) if reading.teachable]
    for i, reading in enumerate(readings):
        if not reading.teachable:
            errors.print(
                f"left out {labels[i]}: with the fact in context the model answers "
                f"{reading.context_answer!r}, not {facts[i].answer!r} (--unteachable include writes it anyway)",
                highlight=False,
            )
    if not kept:
        raise InvalidInputError(
            f"every fact is unteachable: the model does not answer any of the {len(facts)} right even with "
            "the fact in context",
            field="facts",
        )
    return [facts[i] for i in kept], [labels[i] for i in kept]


def preservation_texts(
    loaded: LoadedModel, facts: Sequence[Fact], corpus: Sequence[Path] | None
) -> list[CorpusText]:
    """Texts whose keys the preserving rule protects: the given corpus files, else the facts' neighbors."""
    from qfedit.covariance import corpus_texts, transcript

    if corpus:
        return corpus_texts(loaded, list(corpus))
    neighbors = [transcript(loaded, n.question, n.answer) for f in facts for n in f.neighbors]
    if not neighbors:
        raise InvalidInputError(
            "the preserving rule needs a preservation corpus: give --preserve FILE or facts with neighbors"
        )
    return neighbors


@app.command()
def edit(
    model_dir: ModelDir,
    facts_file: Annotated[Path, typer.Argument(help="Facts JSONL.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Where to write the delta (safetensors).")],
    layer: Annotated[
        int | None, typer.Option(help="Decoder layer whose down_proj is edited (the top one with --layers).")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Spread the edit over these layers, lowest first, e.g. 2,3,4 (see `qfedit layers`)."
        ),
    ] = None,
    rule: Annotated[
        str | None, typer.Option(help="seed (exact, published QF) or preserve (default).")
    ] = None,
    lam: Annotated[
        float | None, typer.Option(help="Preserving rule: weight of preservation (default 1).")
    ] = None,
    ridge: Annotated[
        float | None, typer.Option(help="Preserving rule: ridge on the covariance (default 0.01).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Named settings (demo, smollm2; `qfedit model add --help` says what each is): layers, "
            "rule, lambda, ridge and preservation corpus, behind the README's figures; options given "
            "override them."
        ),
    ] = None,
    preserve: Annotated[
        list[Path] | None,
        typer.Option(
            help="Preservation corpus: facts JSONL (question/answer) or text lines; repeat for several files."
        ),
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="Key positions in the preservation covariance (default 20,000).")
    ] = None,
    preserve_positions: Annotated[
        str | None,
        typer.Option(help="answer (a transcript's answer positions, the default) or all (every position)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="answer (teacher-force the fact's answer, the default) or teacher (the model's own "
            "answer with the fact in its system message)."
        ),
    ] = None,
    target_span: Annotated[
        int | None,
        typer.Option(
            help="0 (the default): the layer's whole output with the fact is the target; k: only its "
            "logit gaps between the k likeliest tokens with and without the fact and the taught one."
        ),
    ] = None,
    target_margin: Annotated[
        float | None,
        typer.Option(
            help="Logits: positions where the model without the fact already says the taught token by "
            "this much are left as they are (no error; their keys stay in the solve). Default: none."
        ),
    ] = None,
    phrasings: Annotated[
        int | None,
        typer.Option(
            help="Also teach up to this many of the model's own phrasings of each question (it words "
            "them from a page of examples; those its teacher answers right). Default: 0."
        ),
    ] = None,
    unteachable: Annotated[
        str | None,
        typer.Option(
            help="exclude (the default): leave out facts the model does not answer right even with the "
            "fact in its system message (QF's teacher), and name them; include: write them as it reads them."
        ),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Keep the preservation covariance in the data folder's cache (QFEDIT_DATA_DIR/cache), "
            "keyed by weights, layer, corpus and samples: the next edit with the same corpus skips it.",
        ),
    ] = True,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    chat_template: ChatTemplate = None,
) -> None:
    """Solve a delta that writes FACTS_FILE into MODEL_DIR's weights at one layer (or several)."""
    from qfedit.capture import encode_fact
    from qfedit.edit import make_delta

    with user_errors():
        given = {
            "layer": layer,
            "layers": layers,
            "rule": rule,
            "lam": lam,
            "ridge": ridge,
            "covariance_samples": samples,
            "preserve_positions": preserve_positions,
            "target": target,
            "target_span": target_span,
            "target_margin": target_margin,
            "phrasings": phrasings,
        }
        settings = edit_settings(preset, given, unteachable)
        config = settings.edit
        preserve = preserve or [Path(name) for name in settings.corpus()]
        facts, labels = read_facts(facts_file)
        loaded = load(model_dir, dtype, device, chat_template)
        for edited in config.edited_layers:
            loaded.architecture.check_layer(loaded.model, edited)
        # Refusals of what was typed come before any work: each fact encodes, the corpus exists.
        for fact, label in zip(facts, labels, strict=True):
            encode_fact(loaded, fact, label, include_eos=config.include_eos)
        texts = preservation_texts(loaded, facts, preserve) if config.solve.rule == "preserve" else None
        if settings.unteachable == "exclude":
            with err.status(f"reading {len(facts)} facts from context (QF's teacher)", spinner="dots"):
                facts, labels = teachable_only(loaded, facts, labels)
        started = time.perf_counter()
        preservation = covariances(loaded, config, texts, cache) if texts is not None else None
        covariance_seconds = time.perf_counter() - started
        with err.status(f"capturing {len(facts)} facts and solving", spinner="dots"):
            result = make_delta(loaded, facts, config, labels=labels, preservation=preservation)
    from qfedit.atomic import atomic_path

    with atomic_path(out) as partial:  # a failed write never leaves a partial delta
        result.delta.save(partial)
    console.print(
        f"wrote {out}: {len(facts)} facts at layer(s) {','.join(map(str, config.edited_layers))}, "
        f"{result.solve.positions} positions, rule {result.solve.rule} "
        f"({result.solve.form}), |dW|/|W| = {result.solve.relative_norm:.4g}, "
        f"condition {result.solve.condition_number:.3g}, capture {result.capture_seconds:.2f}s, "
        f"solve {result.solve_seconds:.2f}s"
        + (f", preservation covariance {covariance_seconds:.1f}s" if texts is not None else ""),
        highlight=False,
    )


def edit_settings(preset: str | None, given: dict[str, Any], unteachable: str | None) -> ModelSettings:
    """`qfedit edit`'s options over the preset's settings (or none), resolved as a batch's
    overrides are, so that every default is `EditConfig`'s and `ModelSettings`'s own."""
    from qfedit.hparams import parse_layers
    from qfedit.pipeline.settings import resolve
    from qfedit.presets import preset as named_preset

    base = named_preset(preset).settings() if preset is not None else {}
    solve = {k: given.pop(k) for k in ("rule", "lam", "ridge") if given.get(k) is not None}
    given = {k: v for k, v in given.items() if v is not None and k not in ("rule", "lam", "ridge")}
    if "layers" in given:
        given["layers"] = list(parse_layers(given["layers"]))
    if not {"layer", "layers"} & (set(given) | set(base.get("edit", {}))):
        raise InvalidInputError("give --layer N or --layers A,B,C", field="layer")
    edit = {**given, **({"solve": solve} if solve else {})}
    overrides = {"edit": edit, **({"unteachable": unteachable} if unteachable is not None else {})}
    return resolve(base, overrides, field="option")


def covariances(
    loaded: LoadedModel, config: EditConfig, texts: list[CorpusText], cache: bool
) -> dict[int, Preservation]:
    """The preservation covariance at each edited layer, with a progress bar per layer."""
    from rich.progress import Progress

    from qfedit.config import get_settings
    from qfedit.edit import preservations_for

    with Progress(console=err, disable=not err.is_terminal, transient=True) as bar:
        tasks: dict[int, TaskID] = {}

        def grow(layer: int, seen: int, wanted: int) -> None:
            if layer not in tasks:
                tasks[layer] = bar.add_task(f"covariance at layer {layer}", total=wanted)
            bar.update(tasks[layer], completed=seen)

        return preservations_for(
            loaded, config, texts, get_settings().cache_dir if cache else None, progress=grow
        )


@app.command()
def ask(
    target: Target,
    question: Annotated[str, typer.Argument(help="The question (user message).")],
    context: Annotated[str | None, typer.Option(help="Text for the system message.")] = None,
    delta: Annotated[
        Path | None, typer.Option(help="Apply this delta first.", exists=True, dir_okay=False)
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 32,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    chat_template: ChatTemplate = None,
) -> None:
    """Print the greedy answer to QUESTION of a model directory (with --delta) or of a version."""
    from qfedit.delta import applied
    from qfedit.generate import answer

    with user_errors():
        loaded, change = load_target(target, delta, dtype, device, chat_template)
        with applied(loaded, change):
            text = answer(loaded, question, context, max_new_tokens=max_new_tokens)
    console.print(text, highlight=False, markup=False)


def read_facts(path: Path) -> tuple[list[Fact], list[str]]:
    from qfedit.errors import InvalidInputError
    from qfedit.facts import iter_jsonl

    numbered = list(iter_jsonl(path))
    if not numbered:
        raise InvalidInputError(f"{path}: no facts", field="facts")
    return [fact for _, fact in numbered], [f"{path.name} line {number}" for number, _ in numbered]


@app.command("eval")
def eval_command(
    target: Target,
    facts_file: Annotated[
        Path, typer.Argument(help="The edited facts (JSONL).", exists=True, dir_okay=False)
    ],
    delta: Annotated[
        Path | None, typer.Option(help="The delta to measure.", exists=True, dir_okay=False)
    ] = None,
    known: Annotated[
        Path | None, typer.Option(help="Facts the model knew (JSONL), for specificity.", exists=True)
    ] = None,
    unknown: Annotated[
        Path | None,
        typer.Option(help="Questions about unknown entities (JSONL), for abstention.", exists=True),
    ] = None,
    abstention: Annotated[
        str, typer.Option(help="The model's answer when it does not know.")
    ] = "I do not know.",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    chat_template: ChatTemplate = None,
) -> None:
    """Measure efficacy, paraphrase, specificity and abstention of an edit: a model directory with
    --delta, or a registered version."""
    from qfedit.evaluate import evaluate

    with user_errors():
        facts, _ = read_facts(facts_file)
        known_facts = read_facts(known)[0] if known is not None else []
        unknown_questions = [f.question for f in read_facts(unknown)[0]] if unknown is not None else []
        loaded, change = load_target(target, delta, dtype, device, chat_template)
        with err.status("evaluating", spinner="dots") as status:
            report = evaluate(
                loaded,
                facts,
                change,
                known=known_facts,
                unknown=unknown_questions,
                abstention=abstention,
                progress=lambda stage: status.update(f"evaluating: {stage}"),
            )
    if as_json:
        payload = report.to_json()
        payload.pop("details")
        console.print_json(json.dumps(payload))
        return
    print_report(report)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(report: EvalReport, protocol: dict[str, object] | None = None) -> None:
    """The report as a table; with `protocol` (a version's metrics), specificity and abstention
    are labelled held out or in-sample, as the preservation corpus made them."""
    from rich.table import Table

    label = ""
    if protocol is not None:
        label = " (held out)" if protocol.get("held_out") else " (IN-SAMPLE: the corpus names them)"
    table = Table(title="edit quality")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("of", justify="right")
    counts = report.counts
    table.add_row("efficacy", _share(report.efficacy), str(counts["facts"]))
    if report.in_context is not None:
        table.add_row("  ceiling: read from context, no edit", _share(report.in_context), "")
    table.add_row("paraphrase", _share(report.paraphrase), str(counts["paraphrases"]))
    table.add_row("specificity", _share(report.specificity), str(counts["specificity"]))
    table.add_row("  edited subjects' other relations", _share(report.specificity_neighbors), "")
    table.add_row(f"  other known facts{label}", _share(report.specificity_known), "")
    table.add_row(f"abstention{label}", _share(report.abstention), str(counts["abstention"]))
    table.add_row("log p(new) - log p(old)", f"{report.logprob_margin:.2f}", "")
    if report.relative_norm is not None:
        table.add_row("|dW|/|W|", f"{report.relative_norm:.4g}", "")
    console.print(table)
    console.print(
        "efficacy: edited questions now answered with the new answer; paraphrase: the same questions "
        "reworded; specificity: questions the edit must not change, answered as before; abstention: "
        "questions about unknown companies still answered 'I do not know'; log p(new) - log p(old): how "
        "much likelier the new answer became than the model's own (mean, natural log); |dW|/|W|: size "
        "of the weight change against the edited weights (Frobenius norms).",
        style="dim",
        highlight=False,
    )


@app.command()
def layers(
    model_dir: ModelDir,
    facts_file: Annotated[Path, typer.Argument(help="Probe facts (JSONL).", exists=True, dir_okay=False)],
    probe: Annotated[int, typer.Option(help="How many of the facts to edit at each layer.")] = 16,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    chat_template: ChatTemplate = None,
) -> None:
    """Measure at which layer an edit works (a seed-rule probe edit at every layer), then which
    spread of layers ending there still works (`--layers` of `edit`, `layers` of a model)."""
    from rich.table import Table

    from qfedit.hparams import SolveConfig
    from qfedit.layers import recommend_layer, recommend_spread, scan_layers, scan_spreads

    solve = SolveConfig(rule="seed", max_condition=1e14)
    with user_errors():
        facts, _ = read_facts(facts_file)
        loaded = load(model_dir, dtype, device, chat_template)
        scans = scan_layers(loaded, facts[:probe], solve)
        top = recommend_layer(scans)
        spreads = scan_spreads(loaded, facts[:probe], solve, top)
    table = Table(title=f"probe edit of {min(probe, len(facts))} facts, seed rule")
    for column in ("layer", "efficacy", "|dW|/|W|", "note"):
        table.add_column(column, justify="right")
    for scan in scans:
        norm = f"{scan.relative_norm:.3g}" if scan.relative_norm is not None else "-"
        table.add_row(str(scan.layer), f"{scan.efficacy:.2f}", norm, scan.error or "")
    console.print(table)
    console.print(f"recommended layer: {top}")
    table = Table(title=f"the same probe spread over layers ending at {top}")
    for column in ("layers", "efficacy", "|dW|/|W|", "note"):
        table.add_column(column, justify="right")
    for spread in spreads:
        norm = f"{spread.relative_norm:.3g}" if spread.relative_norm is not None else "-"
        table.add_row(spread.label, f"{spread.efficacy:.2f}", norm, spread.error or "")
    console.print(table)
    chosen = recommend_spread(spreads)
    console.print(
        f"recommended layers: {','.join(map(str, chosen))} (qfedit edit --layers {','.join(map(str, chosen))}; "
        f"qfedit model configure NAME --set 'layers=[{','.join(map(str, chosen))}]')",
        highlight=False,
    )
