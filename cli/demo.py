"""`qfedit demo`: the shipped demo model edited end to end on the embedded default."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.orm import Session

from cli.app import app
from cli.common import current_actor, in_session
from cli.queue import run_batch
from qfedit import registry
from qfedit.config import get_settings
from qfedit.db.models import Version
from qfedit.errors import ConflictError
from qfedit.pipeline import submit

console = Console()


@app.command()
def demo(
    facts: Annotated[int, typer.Option(help="How many of the bundled edit facts to write in.")] = 20,
    show: Annotated[int, typer.Option(help="How many facts to show before/with context/after.")] = 5,
    updates: Annotated[
        int, typer.Option(help="How many facts the model already knows to change (a new CEO, say).")
    ] = 1,
) -> None:
    """The main job on the embedded default: edit bundled facts into the demo model through the queue."""
    from cli.engine import load, print_report
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH, UPDATES_PATH
    from qfedit.demo.settings import demo_settings
    from qfedit.evaluate import EvalReport
    from qfedit.facts import read_jsonl, write_jsonl
    from qfedit.generate import answer_batch
    from qfedit.importing import import_facts
    from qfedit.modeling import weights_fingerprint
    from qfedit.serving import load_version_delta
    from qfedit.store import store_from_settings

    settings = get_settings()
    changed = read_jsonl(UPDATES_PATH)[:updates]
    chosen = read_jsonl(EDITS_PATH)[:facts] + changed
    corpus = settings.data_dir / "demo-facts.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(chosen, corpus)
    console.rule("qfedit demo")
    for part, where in settings.locations().items():
        console.print(f"{part}: {where}", highlight=False, soft_wrap=True)

    def prepare(session: Session) -> int:
        fingerprint = weights_fingerprint(DEMO_MODEL_DIR)
        try:
            model = registry.get_model(session, "demo")
        except registry.NotFoundError:
            model = registry.add_model(
                session,
                name="demo",
                source=str(DEMO_MODEL_DIR),
                fingerprint=fingerprint,
                actor=current_actor(),
            )
            model.settings = demo_settings()
            session.commit()
        mismatch = registry.base_mismatch(model, fingerprint, "the shipped demo model")
        if mismatch:
            raise ConflictError(
                f"{mismatch} (data folder {settings.data_dir.resolve()}); run the demo with another "
                "QFEDIT_DATA_DIR, or remove that folder to start over"
            )
        summary = import_facts(session, corpus, model, actor=current_actor())
        console.print(
            f"imported {summary.imported} facts ({summary.duplicates} already known)", highlight=False
        )
        wanted = {f.content_hash() for f in chosen}
        ids = [row.id for row in registry.list_facts(session, model=model) if row.content_hash in wanted]
        key = f"demo:{registry.digest_of_hashes(wanted)}"
        batch = submit.submit_batch(
            session, model=model, fact_ids=ids, requested_by=current_actor(), idempotency_key=key
        )
        session.commit()
        return batch.id

    batch_id = in_session(prepare)
    run_batch(batch_id, wait=True)

    def published(session: Session) -> tuple[object, dict[str, object]]:
        from sqlalchemy import select

        version = session.scalar(select(Version).where(Version.batch_id == batch_id))
        assert version is not None
        delta = load_version_delta(store_from_settings(settings), version)
        return delta, {
            "label": version.label,
            "metrics": version.metrics,
            "norm": version.relative_update_norm,
        }

    delta, info = in_session(published)
    loaded = load(DEMO_MODEL_DIR, settings.dtype, settings.device)
    from qfedit.delta import applied
    from qfedit.evaluate import contains

    with applied(loaded, delta):  # type: ignore[arg-type]
        edited = answer_batch(loaded, [f.question for f in chosen])
    # The facts the edit missed come first, all of them; then `show` right ones and the updates.
    missed = [i for i, (f, a) in enumerate(zip(chosen, edited, strict=True)) if not contains(a, f.answer)]
    rewrites = [i for i in range(len(chosen) - len(changed), len(chosen)) if i not in missed]
    right = [i for i in range(len(chosen) - len(changed)) if i not in missed]
    rows = missed + right[:show] + rewrites
    sample = [chosen[i] for i in rows]
    questions = [f.question for f in sample]
    before = answer_batch(loaded, questions)
    with_context = answer_batch(loaded, questions, [f.context for f in sample])
    after = [edited[i] for i in rows]
    from rich.table import Table

    console.print(
        f"{len(chosen) - len(missed)} of {len(chosen)} edited facts answered right after the edit"
        + (", the misses first below" if missed else ""),
        highlight=False,
        soft_wrap=True,
    )
    table = Table(title=f"answers, base model vs {info['label']}")
    for column in ("", "question", "expected", "before", "with context", "after edit"):
        table.add_column(column)
    for index, fact, b, c, a in zip(rows, sample, before, with_context, after, strict=True):
        kind = "update" if fact in changed else "new"
        table.add_row(f"{kind}, missed" if index in missed else kind, fact.question, fact.answer, b, c, a)
    console.print(table)
    metrics = dict(info["metrics"])  # type: ignore[call-overload]
    excluded, superseded = metrics.pop("excluded", None), metrics.pop("superseded", None)
    if metrics:
        protocol = metrics.pop("protocol", None)
        print_report(EvalReport(**{**metrics, "relative_norm": info["norm"]}), protocol)
    if superseded:
        console.print(
            f"updates of what the model knew: {superseded['base_answers'] + superseded['facts']}; left out "
            f"as stating the old answers: preservation transcripts {superseded['preservation_left_out']}, "
            f"evaluation facts {superseded['evaluation_left_out']}",
            highlight=False,
        )
    if excluded:
        console.print(
            f"{excluded['unteachable']} facts left out: the model does not answer them right even with the "
            f"fact in context (qfedit batch status {batch_id})",
            highlight=False,
        )
    console.print(f"see the history: qfedit versions, qfedit show {info['label']}, qfedit log")
