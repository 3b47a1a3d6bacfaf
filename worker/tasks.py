"""Thin tasks: ids in, `qfedit.pipeline` steps, and the next tasks out.

Only a transient failure (`qfedit.errors.TransientError`, a lost database or broker connection)
is retried, up to `task_attempts` times: anything else (a fact that cannot be captured, an
ill-conditioned system, a model whose weights changed, a bug) would fail the same way again, so
it fails its batch at once with the reason, and the queue moves on. A task that kills its worker
(out of memory, a crash) raises nothing here and is delivered again: its starts are counted in
the database (`qfedit.pipeline.deliveries`), and after `max_task_deliveries` deaths its batch fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from celery import Celery, Task
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from qfedit import registry
from qfedit.config import Settings
from qfedit.cpu import WaitReport, torch_threads
from qfedit.errors import TransientError
from qfedit.pipeline import deliveries, lifecycle, publish, steps, submit
from worker.runtime import Runtime, make_runtime

log = logging.getLogger(__name__)


def _chaos_pause(stage: str) -> None:
    """Fault-injection point for the crash tests: `QFEDIT_CHAOS_PAUSE=capture:3,solve:3` sleeps
    that long in the middle of a stage (after its work, before its commit)."""
    spec = os.environ.get("QFEDIT_CHAOS_PAUSE")
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name == stage:
            log.warning("chaos: pausing %s for %ss", stage, seconds)
            time.sleep(float(seconds))


def _runtime(task: Task) -> Runtime:
    # Made on the first task, in the process that runs tasks, and kept for its life.
    rt: Runtime | None = getattr(task.app, "qfedit_runtime", None)
    if rt is None:
        settings: Settings = task.app.qfedit_settings  # type: ignore[attr-defined]
        rt = make_runtime(settings)
        task.app.qfedit_runtime = rt  # type: ignore[attr-defined]
    return rt


def _fail(rt: Runtime, batch_id: int, error: BaseException) -> None:
    with rt.sessions() as session:
        batch = registry.get_batch(session, batch_id, for_update=True)
        lifecycle.fail_batch(session, batch, f"{type(error).__name__}: {error}")
        session.commit()
    log.error("batch %d failed: %s", batch_id, error)


@contextmanager
def _started(task: Task, rt: Runtime, batch_id: int, name: str) -> Iterator[None]:
    """Record this start of the batch's task `name` before its work, and its end after, however it
    ends short of its worker dying (`qfedit.pipeline.deliveries`)."""
    with rt.sessions() as session:
        start = deliveries.begin(
            session,
            batch_id,
            name,
            hostname=task.request.hostname or "",
            pid=os.getpid(),
            limit=rt.settings.max_task_deliveries,
            heartbeat_s=rt.settings.heartbeat_s,
        )
    try:
        yield
    finally:
        if start is not None:
            try:
                with rt.sessions() as session:
                    deliveries.end(session, batch_id, name, start)
            except SQLAlchemyError as error:  # the start then counts once this worker is gone
                log.warning("batch %d: the end of %s not recorded: %s", batch_id, name, error)


def _waiting_for_cores(rt: Runtime, batch_id: int) -> WaitReport:
    """Tell the batch's status that its task waits for cores that other tasks hold, and when it
    stops waiting: without it, a batch waiting for another deployment's tasks looked stuck."""
    folder = rt.cpu.folder if rt.cpu is not None else None

    def report(waited: float | None) -> None:
        note = None
        if waited is not None:
            since = datetime.now(timezone.utc) - timedelta(seconds=waited)
            note = (
                f"waiting since {since:%H:%M:%S} UTC for free CPU cores: other tasks of this host's "
                f"workers hold them ({folder})"
            )
            log.info("batch %d: %s", batch_id, note)
        try:
            with rt.sessions() as session:
                lifecycle.set_waiting(session, batch_id, note)
                session.commit()
        except SQLAlchemyError as error:  # a note is not worth the task
            log.warning("batch %d: its wait for cores not recorded: %s", batch_id, error)

    return report


# What may succeed on another try: the database or a connection was away for a moment, or a
# concurrent delivery won a race for a unique row (the retry re-reads and finds its work done).
TRANSIENT = (TransientError, OperationalError, InterfaceError, IntegrityError, ConnectionError, TimeoutError)


def _retry_or_fail(task: Task, rt: Runtime, batch_id: int, error: Exception) -> None:
    if not isinstance(error, TRANSIENT) or task.request.retries + 1 >= rt.settings.task_attempts:
        _fail(rt, batch_id, error)
        return
    log.warning("batch %d: %s; retrying", batch_id, error)
    raise task.retry(exc=error, countdown=min(30, 2**task.request.retries))


def register(app: Celery) -> None:
    @app.task(name="qfedit.start_batch", bind=True, max_retries=None)
    def start_batch(self: Task, batch_id: int) -> None:
        rt = _runtime(self)
        try:
            with _started(self, rt, batch_id, "start_batch"), rt.sessions() as session:
                nxt = steps.start_batch(session, batch_id)
        except Exception as error:
            _retry_or_fail(self, rt, batch_id, error)
            return
        if nxt.wait:
            raise self.retry(countdown=rt.settings.line_wait_s, max_retries=None)
        for shard_id in nxt.capture:
            capture_shard.apply_async(args=[batch_id, shard_id])
        if nxt.solve:
            solve_batch.apply_async(args=[batch_id])

    @app.task(name="qfedit.capture_shard", bind=True, max_retries=None)
    def capture_shard(self: Task, batch_id: int, shard_id: int) -> None:
        rt = _runtime(self)
        try:
            with (
                _started(self, rt, batch_id, f"capture_shard:{shard_id}"),
                rt.sessions() as session,
                torch_threads(rt.cpu, rt.settings.torch_threads, waiting=_waiting_for_cores(rt, batch_id)),
            ):
                ready = steps.capture_shard(
                    session, rt.store, rt.models, shard_id, before_commit=lambda: _chaos_pause("capture")
                )
        except Exception as error:
            _retry_or_fail(self, rt, batch_id, error)
            return
        if ready is not None:
            solve_batch.apply_async(args=[ready])

    @app.task(name="qfedit.solve_batch", bind=True, max_retries=None)
    def solve_batch(self: Task, batch_id: int) -> None:
        rt = _runtime(self)
        try:
            # The solve follows the last capture shard: the other workers' cores are likely idle.
            with (
                _started(self, rt, batch_id, "solve_batch"),
                torch_threads(
                    rt.cpu, rt.settings.torch_threads, borrow=True, waiting=_waiting_for_cores(rt, batch_id)
                ) as threads,
            ):
                log.info("batch %d: solving on %d threads", batch_id, threads)
                publish.solve_batch(
                    rt.sessions,
                    rt.store,
                    rt.models,
                    batch_id,
                    rt.settings,
                    before_commit=lambda: _chaos_pause("solve"),
                )
        except Exception as error:
            _retry_or_fail(self, rt, batch_id, error)

    @app.task(name="qfedit.nightly", bind=True)
    def nightly(self: Task) -> list[int]:
        rt = _runtime(self)
        day = datetime.now(timezone.utc).date().isoformat()
        with rt.sessions() as session:
            batches = submit.nightly_batches(session, day, app=rt.settings)
            ids = [batch.id for batch in batches]
            session.commit()
        for batch_id in ids:
            start_batch.apply_async(args=[batch_id])
        return ids

    @app.task(name="qfedit.resend_stalled", bind=True)
    def resend_stalled(self: Task) -> list[int]:
        rt = _runtime(self)
        with rt.sessions() as session:
            ids = lifecycle.stalled_batches(session, rt.settings.stall_after_s)
        for batch_id in ids:
            start_batch.apply_async(args=[batch_id])
        return ids

    app.conf.qfedit_tasks = {
        "start_batch": start_batch,
        "capture_shard": capture_shard,
        "solve_batch": solve_batch,
    }
