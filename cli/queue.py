"""Queue commands of the `qfedit` CLI: workers, the scheduler, batches and retraction.

With no `QFEDIT_BROKER_URL`, `batch submit` and `retract` run the embedded default: the batch is
enqueued on a broker in the data folder and a worker child process runs it through the same
tasks as production, then exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from sqlalchemy.orm import Session

from cli.app import app, batch_app
from cli.common import (
    JsonOption,
    current_actor,
    emit_json,
    errors,
    in_session,
    model_of_facts,
    single_model,
    user_errors,
)
from qfedit import registry
from qfedit.app import views
from qfedit.config import Settings, get_settings
from qfedit.db.models import Batch
from qfedit.pipeline import lifecycle, submit
from qfedit.registry.workers import live_within_s
from worker.app import DEFAULT_QUEUE, GPU_QUEUE, queue_names
from worker.client import app_for, enqueue_batch

console = Console()


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues to consume (QFEDIT_QUEUE_PREFIX is put before each).")
    ] = f"{GPU_QUEUE},{DEFAULT_QUEUE}",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Worker name (default: celery's).")] = None,
) -> None:
    """Run a worker process: one per GPU (set CUDA_VISIBLE_DEVICES), the model loaded once in it."""
    from qfedit.cpu import host_tokens

    settings = get_settings()
    with user_errors():  # refused here, not by every task: the folder of the shared cores
        host_tokens(settings)
    # The queues as this deployment names them on the broker (QFEDIT_QUEUE_PREFIX).
    named = ",".join(settings.queue(q.strip()) for q in queues.split(",") if q.strip())
    argv = ["worker", "--pool", "solo", "--concurrency", "1", "--queues", named, "--loglevel", loglevel]
    # Workers coordinate through the database (heartbeat rows), not celery's gossip; mingle's
    # start-up poll of neighbours (revoked ids, clocks: neither used here) cost ~0.5 s a start.
    argv += ["--without-mingle", "--without-gossip"]
    if hostname:
        argv += ["--hostname", hostname]
    app_for(settings).worker_main(argv)


@app.command()
def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run the scheduler (exactly one): nightly edits of pending facts at QFEDIT_NIGHTLY_AT
    (HH:MM, UTC), resending stalled batches. On the embedded default it runs a worker child too,
    as `qfedit api` does, so what it sends is run."""
    settings = get_settings()
    schedule = settings.data_dir / "beat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"nightly edits at {settings.nightly_at} UTC", highlight=False)
    with embedded_worker(settings):
        app_for(settings).start(["beat", "--loglevel", loglevel, "--schedule", str(schedule)])


@app.command()
def nightly(
    wait: Annotated[
        bool, typer.Option(help="Follow the batches until they finish (always, when embedded).")
    ] = False,
) -> None:
    """Run today's nightly edit now: one batch of pending facts per model, as `beat` sends it at
    QFEDIT_NIGHTLY_AT (UTC), with the same key (model and day), so beat makes no second one."""
    from datetime import datetime, timezone

    day = datetime.now(timezone.utc).date().isoformat()

    def work(session: Session) -> list[tuple[int, str, str]]:
        batches = submit.nightly_batches(session, day, actor=current_actor(), app=get_settings())
        session.commit()
        return [(batch.id, batch.model.name, batch.status.value) for batch in batches]

    ended = {"published", "failed", "cancelled"}
    batches = in_session(work)
    for batch_id, model, status in batches:
        if status in ended:  # today's batch of this model already ran (the same key returns it)
            console.print(f"batch {batch_id}, {model}'s nightly batch of {day}: already {status}")
    todo = [batch_id for batch_id, _, status in batches if status not in ended]
    if not batches:
        console.print("no model has pending facts: nothing to edit tonight")
    for batch_id in todo:
        run_batch(batch_id, wait)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _ends_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the kernel send the child SIGTERM when its parent ends, however
    it ends (SIGKILL, a crash); None where there is no `prctl` (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    # The library is loaded here, in the parent: between fork and exec the child only calls it.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the request was in place
            os._exit(1)

    return child


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises `SystemExit` while in the block, so that `finally` clauses run. uvicorn
    re-raises the signal it caught once it has shut down: with the default action the process
    died there, and the embedded worker child outlived it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class WorkerChild:
    """The embedded default's worker child; `done` once the work it was started for is final."""

    process: subprocess.Popen[bytes]
    hostname: str
    done: bool = False


@contextmanager
def embedded_worker(settings: Settings) -> Iterator[WorkerChild | None]:
    """A worker child on the embedded broker, when no broker is configured; stopped on exit, and
    by the kernel when this process ends without one (SIGKILL)."""
    if settings.broker_url:
        yield None
        return
    log = (settings.data_dir / "worker.log").open("ab")
    hostname = f"embedded-{os.getpid()}@{socket.gethostname()}"
    with _exit_on_sigterm():
        child = WorkerChild(
            subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING", "--hostname", hostname],
                stdout=log,
                stderr=log,
                env=os.environ.copy(),
                preexec_fn=_ends_with_parent(),
            ),
            hostname,
        )
        try:
            yield child
        finally:
            _stop(child)
            log.close()


def _stop(child: WorkerChild) -> None:
    """A warm shutdown, unless the child's work is done: celery's loop on the file broker notices a
    stop only after two of its 2 s polls and its timer's sleep (~5 s after every batch), and a
    child whose batch is final has nothing to finish (and every task is safe to kill, as any
    worker's may be), so it is killed and its heartbeat row dropped."""
    process = child.process
    if child.done:
        process.kill()
        process.wait()

        def forget(session: Session) -> None:
            registry.forget_worker(session, child.hostname)
            session.commit()

        in_session(forget)
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def describe(batch: Batch, state: lifecycle.Progress) -> str:
    """`capturing, 3/21 facts captured`, then what the task is doing or waiting for."""
    described = f"{state.stage}, {state.captured}/{state.facts} facts captured"
    if batch.activity and batch.status not in lifecycle.FINAL:
        described += f"; {batch.activity}"
    if batch.waiting:
        described += f"; {batch.waiting}"
    return described


def watch_batch(batch_id: int, *, timeout: float | None = None, child: WorkerChild | None = None) -> Batch:
    """Follow a batch with a progress bar until it is published, failed or cancelled."""
    settings = get_settings()
    from qfedit.db import engine_from_settings, session_factory

    sessions = session_factory(engine_from_settings(settings))
    started = time.monotonic()
    # The time is the batch's own, from the database (submitted to finished, or to now), not this
    # command's: a watch started late, or of a retried batch, still shows how long it has taken.
    columns = (
        TextColumn("batch {task.fields[batch]}: {task.description}"),
        BarColumn(),
        TextColumn("{task.fields[elapsed]}"),
    )
    # On stderr: progress is not output, and `--json` keeps stdout to one JSON document.
    with Progress(*columns, console=errors, transient=False) as progress:
        task = progress.add_task("queued", total=1.0, batch=batch_id, elapsed="")
        while True:
            with sessions() as session:
                batch = registry.get_batch(session, batch_id)
                state = lifecycle.batch_progress(session, batch)
                session.expunge_all()
            progress.update(
                task,
                description=describe(batch, state),
                completed=batch.progress,
                elapsed=clock(lifecycle.elapsed_s(batch)),
            )
            if batch.status in lifecycle.FINAL:
                return batch
            if child is not None and child.process.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with status {child.process.returncode}; see {settings.data_dir / 'worker.log'}"
                )
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"batch {batch_id} still {batch.status.value} after {timeout:.0f}s")
            time.sleep(0.5)


def _listeners(session: Session) -> str:
    """Which workers will run a batch, or a warning that none will (none seen lately on a queue)."""
    settings = get_settings()
    workers = registry.live_workers(session, settings.heartbeat_s)
    missing = [q for q in queue_names(settings) if not registry.listening(workers, q)]
    if not missing:
        return f"workers listening: {', '.join(w.hostname for w in workers)}"
    return "[yellow]warning:[/yellow] " + (
        f"no worker seen in the last {live_within_s(settings.heartbeat_s):.0f} s consumes "
        f"{' or '.join(repr(q) for q in missing)}: the batch waits until one starts (`qfedit worker`)"
    )


def run_batch(batch_id: int, wait: bool, as_json: bool = False) -> None:
    """Enqueue a committed batch and follow it (always on the embedded default); `as_json` prints
    the batch as JSON at the end, the human lines going to stderr."""
    settings = get_settings()
    enqueue_batch(batch_id, settings)
    say = errors if as_json else console
    if not wait and settings.broker_url:
        default, gpu = queue_names(settings)
        say.print(f"batch {batch_id} queued on {default!r} (capture and solve run on {gpu!r})")
        say.print(in_session(_listeners), highlight=False)
        if as_json:
            in_session(lambda session: emit_json(_batch_json(session, batch_id)))
        return
    with embedded_worker(settings) as child:
        batch = watch_batch(batch_id, child=child)
        if child is not None:
            child.done = True
    if as_json:
        in_session(lambda session: emit_json(_batch_json(session, batch_id)))
    if batch.status.value != "published":
        say.print(f"[red]batch {batch_id} {batch.status.value}[/red]: {batch.error or ''}", highlight=False)
        raise typer.Exit(1)
    if as_json:
        return

    def made(session: Session) -> str:
        version = registry.version_of_batch(session, registry.get_batch(session, batch_id))
        if version is None:
            return f"batch {batch_id} published"
        shown = ", ".join(
            f"{name} {value:.2f}"
            for name, value in version.metrics.items()
            if name in ("efficacy", "paraphrase", "specificity", "abstention") and isinstance(value, float)
        )
        line = f"batch {batch_id} published {version.label}" + (f": {shown}" if shown else "")
        left_out = version.metrics.get("excluded", {}).get("unteachable")
        if left_out:
            line += (
                f"\n{left_out} facts left out: the model does not answer them right even with the fact "
                f"in context (qfedit batch status {batch_id})"
            )
        return line

    console.print(in_session(made), highlight=False)


def _batch_json(session: Session, batch_id: int) -> dict[str, object]:
    return views.batch_out(session, registry.get_batch(session, batch_id)).model_dump(mode="json")


@batch_app.command("submit")
def batch_submit(
    model_name: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model name (default: the facts' model, or the only model)."),
    ] = None,
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
    if wanted != ["pending"] and not all(item.isdigit() for item in wanted):
        raise typer.BadParameter(f"{' '.join(wanted)!r}: give 'pending' or fact ids", param_hint="--facts")
    ids = None if wanted == ["pending"] else [int(item) for item in wanted]

    def work(session: Session) -> int:
        model = single_model(session, model_name) if ids is None else model_of_facts(session, model_name, ids)
        replayed = registry.batch_id_for_key(session, idempotency_key) is not None
        batch = submit.submit_batch(
            session, model=model, fact_ids=ids, requested_by=current_actor(), idempotency_key=idempotency_key
        )
        session.commit()
        if replayed:
            (errors if as_json else console).print(
                f"batch {batch.id} already exists for idempotency key {idempotency_key!r} "
                f"(submitted {batch.created_at:%Y-%m-%d %H:%M:%S} UTC by {batch.requested_by}, "
                f"now {batch.status.value}): no new batch",
                highlight=False,
                markup=False,
            )
        return batch.id

    run_batch(in_session(work), wait, as_json)


@app.command()
def retract(
    fact_ids: Annotated[list[int], typer.Argument(help="Ids of the facts to take out.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log and the version).")],
    model_name: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name (default: the facts' model).")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting the same key twice makes one batch.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the batch until it finishes (always, when embedded).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Publish a version without these facts (their statistics subtracted)."""

    def work(session: Session) -> int:
        from cli.common import model_of_facts

        model = model_of_facts(session, model_name, fact_ids)
        batch = submit.submit_retraction(
            session,
            model=model,
            fact_ids=fact_ids,
            reason=reason,
            requested_by=current_actor(),
            idempotency_key=idempotency_key,
        )
        session.commit()
        return batch.id

    run_batch(in_session(work), wait, as_json)


@batch_app.command("status")
def batch_status(batch_id: int, as_json: JsonOption = False) -> None:
    """Show a batch: stage, progress, attempts, error."""

    def work(session: Session) -> None:
        batch = registry.get_batch(session, batch_id)
        info = views.batch_out(session, batch).model_dump(mode="json")
        if as_json:
            emit_json(info)
            return
        for key, value in info.items():
            console.print(f"{key:>16}: {value}", highlight=False)
        console.print(f"{'elapsed':>16}: {clock(info['elapsed_s'])}", highlight=False)

    in_session(work)


@batch_app.command("list")
def batch_list(
    model_name: Annotated[str | None, typer.Option("--model", "-m", help="Only this model's.")] = None,
    status: Annotated[str | None, typer.Option(help="Only batches in this status, e.g. failed.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1, max=10_000)] = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent batches, newest first: model, kind, status, facts captured, version made."""
    from rich.table import Table

    from qfedit.db.models import BatchStatus
    from qfedit.errors import InvalidInputError

    def work(session: Session) -> None:
        try:
            wanted = BatchStatus(status) if status is not None else None
        except ValueError:
            names = ", ".join(s.value for s in BatchStatus)
            raise InvalidInputError(f"--status {status!r}: one of {names}", field="status") from None
        model = registry.get_model(session, model_name) if model_name else None
        shown = [
            views.batch_out(session, b)
            for b in registry.list_batches(session, model=model, status=wanted, limit=limit)
        ]
        if as_json:
            emit_json([b.model_dump(mode="json") for b in shown])
            return
        table = Table("batch", "model", "kind", "status", "captured", "version", "by")
        for b in shown:
            captured = f"{b.captured}/{b.fact_count}"
            table.add_row(str(b.id), b.model, b.kind, b.status, captured, b.version or "-", b.requested_by)
        console.print(table)

    in_session(work)


@batch_app.command("watch")
def batch_watch(
    batch_id: int,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
) -> None:
    """Follow a batch with a progress bar until it finishes."""
    batch = watch_batch(batch_id, timeout=timeout)
    console.print(f"batch {batch_id} {batch.status.value}" + (f": {batch.error}" if batch.error else ""))


@batch_app.command("cancel")
def batch_cancel(batch_id: int, as_json: JsonOption = False) -> None:
    """Cancel a batch that has not published."""

    def work(session: Session) -> None:
        batch = registry.get_batch(session, batch_id, for_update=True)
        lifecycle.cancel_batch(session, batch, actor=current_actor())
        session.commit()
        if as_json:
            emit_json(_batch_json(session, batch_id))
        else:
            console.print(f"batch {batch_id} cancelled")

    in_session(work)
