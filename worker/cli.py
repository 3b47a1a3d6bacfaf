"""Queue commands of the `qfedit` CLI: workers, the scheduler, batches and retraction.

With no `QFEDIT_BROKER_URL`, `batch submit` and `retract` run the embedded default: the batch is
enqueued on a broker in the data folder and a worker child process runs it through the same
tasks as production, then exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.cli import app
from qfedit.cli.state import JsonOption, _actor, _emit_json, _in_session, model_app
from qfedit.config import Settings, get_settings
from qfedit.db.models import Batch, Version
from qfedit.pipeline import lifecycle, submit
from qfedit.pipeline.settings import nested, validate_settings
from worker.app import DEFAULT_QUEUE, GPU_QUEUE
from worker.client import app_for, enqueue_batch

console = Console()
batch_app = typer.Typer(no_args_is_help=True, help="Edit batches: submit, follow, cancel.")
app.add_typer(batch_app, name="batch")


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues to consume.")
    ] = f"{GPU_QUEUE},{DEFAULT_QUEUE}",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Worker name (default: celery's).")] = None,
) -> None:
    """Run a worker process: one per GPU (set CUDA_VISIBLE_DEVICES), the model loaded once in it."""
    argv = ["worker", "--pool", "solo", "--concurrency", "1", "--queues", queues, "--loglevel", loglevel]
    if hostname:
        argv += ["--hostname", hostname]
    app_for(get_settings()).worker_main(argv)


@app.command()
def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run the scheduler (exactly one): nightly edits of pending facts, resending stalled batches."""
    settings = get_settings()
    schedule = settings.data_dir / "beat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app_for(settings).start(["beat", "--loglevel", loglevel, "--schedule", str(schedule)])


def _describe(batch: Batch, progress: lifecycle.Progress | None = None) -> dict[str, object]:
    info: dict[str, object] = {
        "id": batch.id,
        "model": batch.model.name,
        "kind": batch.kind.value,
        "status": batch.status.value,
        "progress": batch.progress,
        "attempts": batch.attempts,
        "error": batch.error,
        "requested_by": batch.requested_by,
        "idempotency_key": batch.idempotency_key,
        "created_at": batch.created_at.isoformat(),
    }
    if progress is not None:
        info.update(facts=progress.facts, captured=progress.captured)
    return info


@contextmanager
def embedded_worker(settings: Settings) -> Iterator[subprocess.Popen[bytes] | None]:
    """A worker child on the embedded broker, when no broker is configured; stopped on exit."""
    if settings.broker_url:
        yield None
        return
    log = (settings.data_dir / "worker.log").open("ab")
    child = subprocess.Popen(
        [sys.executable, "-m", "qfedit", "worker", "--loglevel", "WARNING"],
        stdout=log,
        stderr=log,
        env=os.environ.copy(),
    )
    try:
        yield child
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()


def watch_batch(
    batch_id: int, *, timeout: float | None = None, child: subprocess.Popen[bytes] | None = None
) -> Batch:
    """Follow a batch with a progress bar until it is published, failed or cancelled."""
    settings = get_settings()
    from qfedit.db import engine_from_settings, session_factory

    sessions = session_factory(engine_from_settings(settings))
    started = time.monotonic()
    columns = (TextColumn("batch {task.fields[batch]}: {task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("queued", total=1.0, batch=batch_id)
        while True:
            with sessions() as session:
                batch = registry.get_batch(session, batch_id)
                state = lifecycle.batch_progress(session, batch)
                session.expunge_all()
            described = f"{state.stage}, {state.captured}/{state.facts} facts captured"
            progress.update(task, description=described, completed=batch.progress)
            if batch.status in lifecycle.FINAL:
                return batch
            if child is not None and child.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with status {child.returncode}; see {settings.data_dir / 'worker.log'}"
                )
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"batch {batch_id} still {batch.status.value} after {timeout:.0f}s")
            time.sleep(0.5)


def _run(batch_id: int, wait: bool) -> None:
    settings = get_settings()
    enqueue_batch(batch_id, settings)
    if not wait and settings.broker_url:
        console.print(f"batch {batch_id} queued")
        return
    with embedded_worker(settings) as child:
        batch = watch_batch(batch_id, child=child)
    if batch.status.value != "published":
        console.print(
            f"[red]batch {batch_id} {batch.status.value}[/red]: {batch.error or ''}", highlight=False
        )
        raise typer.Exit(1)
    console.print(f"batch {batch_id} published")


@batch_app.command("submit")
def batch_submit(
    model_name: Annotated[str, typer.Option("--model", "-m", help="Model name.")],
    facts: Annotated[
        list[str] | None, typer.Option("--facts", help="'pending' (default) or fact ids.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting the same key twice makes one batch.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the batch until it finishes (always, when embedded).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Enqueue an edit batch of a model's pending facts (or the given ids)."""
    wanted = facts or ["pending"]
    ids = None if wanted == ["pending"] else [int(item) for item in wanted]

    def work(session: Session) -> int:
        model = registry.get_model(session, model_name)
        batch = submit.submit_batch(
            session, model=model, fact_ids=ids, requested_by=_actor(), idempotency_key=idempotency_key
        )
        session.commit()
        if as_json:
            _emit_json(_describe(batch))
        return batch.id

    _run(_in_session(work), wait)


@app.command()
def retract(
    fact_ids: Annotated[list[int], typer.Argument(help="Ids of the facts to take out.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log and the version).")],
    model_name: Annotated[str | None, typer.Option("--model", "-m", help="Model name.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting the same key twice makes one batch.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the batch until it finishes (always, when embedded).")
    ] = False,
) -> None:
    """Publish a version without these facts (their statistics subtracted)."""

    def work(session: Session) -> int:
        from qfedit.cli.state import _single_model

        model = _single_model(session, model_name)
        batch = submit.submit_retraction(
            session,
            model=model,
            fact_ids=fact_ids,
            reason=reason,
            requested_by=_actor(),
            idempotency_key=idempotency_key,
        )
        session.commit()
        return batch.id

    _run(_in_session(work), wait)


@batch_app.command("status")
def batch_status(batch_id: int, as_json: JsonOption = False) -> None:
    """Show a batch: stage, progress, attempts, error."""

    def work(session: Session) -> None:
        batch = registry.get_batch(session, batch_id)
        info = _describe(batch, lifecycle.batch_progress(session, batch))
        if as_json:
            _emit_json(info)
            return
        for key, value in info.items():
            console.print(f"{key:>16}: {value}", highlight=False)

    _in_session(work)


@batch_app.command("watch")
def batch_watch(
    batch_id: int,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
) -> None:
    """Follow a batch with a progress bar until it finishes."""
    batch = watch_batch(batch_id, timeout=timeout)
    console.print(f"batch {batch_id} {batch.status.value}" + (f": {batch.error}" if batch.error else ""))


@batch_app.command("cancel")
def batch_cancel(batch_id: int) -> None:
    """Cancel a batch that has not published."""

    def work(session: Session) -> None:
        batch = registry.get_batch(session, batch_id, for_update=True)
        lifecycle.cancel_batch(session, batch, actor=_actor())
        session.commit()
        console.print(f"batch {batch_id} cancelled")

    _in_session(work)


def _assign(target: dict[str, object], dotted: str, raw: str) -> None:
    """`solve.lam=10` sets target["solve"]["lam"] = 10; values are JSON when they parse as JSON."""
    import json

    keys = dotted.split(".")
    for key in keys[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"setting {dotted!r}: {key!r} is not a group")
        target = child
    try:
        target[keys[-1]] = json.loads(raw)
    except json.JSONDecodeError:
        target[keys[-1]] = raw


@model_app.command("configure")
def model_configure(
    name: str,
    assignments: Annotated[
        list[str] | None,
        typer.Option("--set", help='KEY=VALUE, e.g. solve.rule=preserve, promote={"efficacy":0.9}'),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show or change how a model's batches are edited (layer, rule, corpora, promotion thresholds)."""

    def work(session: Session) -> None:
        model = registry.get_model(session, name)
        current = nested(model.settings)
        for item in assignments or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE")
            _assign(current, key.strip(), raw)
        validated = validate_settings(current, default_layer=model.default_layer, field="settings")
        if assignments:
            model.settings = validated.model_dump(mode="json", exclude_defaults=True)
            registry.record_audit(
                session,
                actor=_actor(),
                action="model.configure",
                object_type="model",
                object_id=model.id,
                details={"settings": model.settings},
            )
            session.commit()
        shown = validated.model_dump(mode="json")
        if as_json:
            _emit_json(shown)
            return
        console.print_json(data=shown)

    _in_session(work)


@app.command()
def demo(
    facts: Annotated[int, typer.Option(help="How many of the bundled edit facts to write in.")] = 20,
    show: Annotated[int, typer.Option(help="How many facts to show before/with context/after.")] = 5,
) -> None:
    """The main job on the embedded default: edit bundled facts into the demo model through the queue."""
    from qfedit.cli.engine import load, print_report
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH, KNOWN_PATH, PRESERVE_PATH, UNKNOWN_PATH
    from qfedit.demo.settings import demo_settings
    from qfedit.evaluate import EvalReport
    from qfedit.facts import read_jsonl, write_jsonl
    from qfedit.generate import answer_batch
    from qfedit.importing import import_facts
    from qfedit.modeling import weights_fingerprint
    from qfedit.serving import load_version_delta
    from qfedit.store import store_from_settings

    settings = get_settings()
    chosen = read_jsonl(EDITS_PATH)[:facts]
    corpus = settings.data_dir / "demo-facts.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(chosen, corpus)
    console.rule("qfedit demo")
    console.print(f"data folder: {settings.data_dir.resolve()}  (database, checkpoint store, broker)")

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
                actor=_actor(),
            )
            model.settings = demo_settings(known=KNOWN_PATH, unknown=UNKNOWN_PATH, preserve=PRESERVE_PATH)
            session.commit()
        mismatch = registry.base_mismatch(model, fingerprint, "the shipped demo model")
        if mismatch:
            raise ValueError(
                f"{mismatch} (data folder {settings.data_dir.resolve()}); run the demo with another "
                "QFEDIT_DATA_DIR, or remove that folder to start over"
            )
        summary = import_facts(session, corpus, model, actor=_actor())
        console.print(
            f"imported {summary.imported} facts ({summary.duplicates} already known)", highlight=False
        )
        wanted = {f.content_hash() for f in chosen}
        ids = [row.id for row in registry.list_facts(session, model=model) if row.content_hash in wanted]
        key = f"demo:{registry.digest_of_hashes(wanted)}"
        batch = submit.submit_batch(
            session, model=model, fact_ids=ids, requested_by=_actor(), idempotency_key=key
        )
        session.commit()
        return batch.id

    batch_id = _in_session(prepare)
    _run(batch_id, wait=True)

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

    delta, info = _in_session(published)
    loaded = load(DEMO_MODEL_DIR, settings.dtype, settings.device)
    sample = chosen[:show]
    questions = [f.question for f in sample]
    before = answer_batch(loaded, questions)
    with_context = answer_batch(loaded, questions, [f.context for f in sample])
    from qfedit.delta import applied

    with applied(loaded, delta):  # type: ignore[arg-type]
        after = answer_batch(loaded, questions)
    from rich.table import Table

    table = Table(title=f"answers, base model vs {info['label']}")
    for column in ("question", "expected", "before", "with context", "after edit"):
        table.add_column(column)
    for fact, b, c, a in zip(sample, before, with_context, after, strict=True):
        table.add_row(fact.question, fact.answer, b, c, a)
    console.print(table)
    metrics = dict(info["metrics"])  # type: ignore[call-overload]
    if metrics:
        print_report(EvalReport(**{**metrics, "relative_norm": info["norm"]}))
    console.print(f"see the history: qfedit versions, qfedit show {info['label']}, qfedit log")
