"""Engine commands: edit a local model directory, ask it questions."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from qfedit.cli import app

if TYPE_CHECKING:
    from qfedit.facts import Fact
    from qfedit.modeling import LoadedModel

console = Console()
err = Console(stderr=True)

ModelDir = Annotated[
    Path, typer.Argument(help="Local Hugging Face model directory.", exists=True, file_okay=False)
]
Dtype = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16, float16.")]
Device = Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda:0.")]
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
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


def load(model_dir: Path, dtype: str, device: str, chat_template: Path | None = None) -> LoadedModel:
    quiet_transformers()
    from qfedit.modeling import load_model

    template = chat_template.read_text() if chat_template is not None else None
    return load_model(model_dir, dtype=dtype, device=device, chat_template=template)


def preservation_texts(loaded: LoadedModel, facts: Sequence[Fact], corpus: Path | None) -> list[str]:
    """Texts whose keys the preserving rule protects: a given corpus, else the facts' neighbors."""
    from qfedit.covariance import fact_texts
    from qfedit.facts import Fact

    if corpus is None:
        neighbors = [
            Fact(question=n.question, answer=n.answer, context="-") for f in facts for n in f.neighbors
        ]
        if not neighbors:
            raise ValueError(
                "the preserving rule needs a preservation corpus: give --preserve FILE or facts with neighbors"
            )
        return fact_texts(loaded, neighbors)
    if corpus.suffix == ".jsonl":
        records = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
        known = [Fact(question=r["question"], answer=r["answer"], context="-") for r in records]
        return fact_texts(loaded, known) if known else []
    return [line for line in corpus.read_text().splitlines() if line.strip()]


@app.command()
def edit(
    model_dir: ModelDir,
    facts_file: Annotated[Path, typer.Argument(help="Facts JSONL.", exists=True, dir_okay=False)],
    layer: Annotated[int, typer.Option(help="Decoder layer whose down_proj is edited.")],
    out: Annotated[Path, typer.Option(help="Where to write the delta (safetensors).")],
    rule: Annotated[str, typer.Option(help="seed (exact, published QF) or preserve.")] = "preserve",
    lam: Annotated[float, typer.Option(help="Preserving rule: weight of preservation.")] = 1.0,
    ridge: Annotated[float, typer.Option(help="Preserving rule: ridge on the covariance.")] = 1e-2,
    preserve: Annotated[
        Path | None, typer.Option(help="Preservation corpus: facts JSONL (question/answer) or text lines.")
    ] = None,
    samples: Annotated[int, typer.Option(help="Key positions in the preservation covariance.")] = 20_000,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    chat_template: ChatTemplate = None,
) -> None:
    """Solve a delta that writes FACTS_FILE into MODEL_DIR's weights at one layer."""
    from qfedit.edit import make_delta, preservation_for
    from qfedit.facts import iter_jsonl
    from qfedit.hparams import EditConfig, SolveConfig

    try:
        config = EditConfig(
            layer=layer,
            solve=SolveConfig(rule=rule, lam=lam, ridge=ridge),  # type: ignore[arg-type]
            covariance_samples=samples,
        )
        numbered = list(iter_jsonl(facts_file))
        if not numbered:
            raise ValueError(f"{facts_file}: no facts")
        facts = [fact for _, fact in numbered]
        labels = [f"{facts_file.name} line {number}" for number, _ in numbered]
        loaded = load(model_dir, dtype, device, chat_template)
        loaded.architecture.check_layer(loaded.model, layer)
        preservation = None
        if config.solve.rule == "preserve":
            preservation = preservation_for(loaded, config, preservation_texts(loaded, facts, preserve))
        result = make_delta(loaded, facts, config, labels=labels, preservation=preservation)
    except ValueError as error:
        raise fail(str(error)) from None
    # Written beside the target and renamed, so a failed write never leaves a partial delta.
    partial = out.with_name(out.name + ".partial")
    result.delta.save(partial)
    partial.replace(out)
    console.print(
        f"wrote {out}: {len(facts)} facts, {result.solve.positions} positions, rule {result.solve.rule} "
        f"({result.solve.form}), |dW|/|W| = {result.solve.relative_norm:.4g}, "
        f"condition {result.solve.condition_number:.3g}, capture {result.capture_seconds:.2f}s, "
        f"solve {result.solve_seconds:.2f}s",
        highlight=False,
    )


@app.command()
def ask(
    model_dir: ModelDir,
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
    """Print the model's greedy answer to QUESTION."""
    from qfedit.delta import Delta, applied
    from qfedit.generate import answer

    try:
        loaded = load(model_dir, dtype, device, chat_template)
        change = Delta.load(delta) if delta is not None else None
        with applied(loaded, change):
            text = answer(loaded, question, context, max_new_tokens=max_new_tokens)
    except ValueError as error:
        raise fail(str(error)) from None
    console.print(text, highlight=False, markup=False)
