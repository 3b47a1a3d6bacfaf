"""Worker deaths, counted: a task that kills its worker (out of memory, a crash in native code,
`kill -9`) is never acknowledged, so the broker delivers it again, and again, forever.

    start = deliveries.begin(session, batch_id, "capture_shard:7", hostname=..., pid=..., limit=3, heartbeat_s=10)
    ...  # the task's work
    deliveries.end(session, batch_id, "capture_shard:7", start)

Each task records its start, committed before its work, and removes it when it ends, however it
ends short of its process dying. A start that no live worker is running is a death: its worker
has stopped beating (`qfedit.registry.workers`) or came back under another process id. Starts
that live workers run now (a duplicate of a slow task) are not deaths. After `limit` deaths of one
task, the next delivery fails its batch, naming the task, and the queue moves on.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from qfedit.db.models import Batch, TaskStart, utcnow
from qfedit.errors import PermanentError
from qfedit.pipeline.lifecycle import ACTIVE, FINAL
from qfedit.registry.workers import live_workers


class WorkerDeathsError(PermanentError):
    """A task whose every start ended its worker: running it again would end another."""


def task_label(task: str) -> str:
    """`capture_shard:7` -> `qfedit.capture_shard (shard 7)`: the task as the worker's log names it."""
    name, _, shard = task.partition(":")
    return f"qfedit.{name}" + (f" (shard {shard})" if shard else "")


def deaths(session: Session, batch_id: int, task: str, *, hostname: str, pid: int, heartbeat_s: float) -> int:
    """Starts of `task` that no live worker runs: the worker died in them. `hostname` and `pid`
    are the asking worker's: an earlier start on its hostname under another pid died with the
    process before it (a restarted worker keeps its name), before its heartbeat shows it."""
    live = {(w.hostname, w.pid) for w in live_workers(session, heartbeat_s)}
    starts = session.execute(
        select(TaskStart.hostname, TaskStart.pid).where(
            TaskStart.batch_id == batch_id, TaskStart.task == task
        )
    )
    return sum(
        1
        for host, process in starts
        if (host == hostname and process != pid) or (host != hostname and (host, process) not in live)
    )


def begin(
    session: Session, batch_id: int, task: str, *, hostname: str, pid: int, limit: int, heartbeat_s: float
) -> int | None:
    """Record this start of `task`, before its work; its id, for `end`. None when the batch is
    final already (the task has nothing to do). Commits. Raises `WorkerDeathsError` when `limit`
    earlier starts of the task died with their worker."""
    status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
    if status is None or status in FINAL:
        session.rollback()
        return None
    died = deaths(session, batch_id, task, hostname=hostname, pid=pid, heartbeat_s=heartbeat_s)
    if died >= limit:
        session.rollback()
        raise WorkerDeathsError(
            f"{task_label(task)} of batch {batch_id} started {died} times and its worker died each time "
            f"(out of memory, a crash, kill -9): not run again (QFEDIT_MAX_TASK_DELIVERIES={limit})"
        )
    start = TaskStart(batch_id=batch_id, task=task, hostname=hostname, pid=pid)
    session.add(start)
    session.commit()
    return start.id


def end(session: Session, batch_id: int, task: str, start: int) -> None:
    """The task that `begin` recorded as `start` ended: its start, and those of the task before it
    (deaths, or duplicates that live workers still run), are history. Commits."""
    session.execute(
        delete(TaskStart).where(TaskStart.batch_id == batch_id, TaskStart.task == task, TaskStart.id <= start)
    )
    session.commit()


def orphaned(session: Session, heartbeat_s: float) -> list[TaskStart]:
    """Starts of active batches' tasks whose worker is gone (no heartbeat within
    `live_within_s(heartbeat_s)`, or another process under its name) and that nobody has handed on yet. A
    start younger than a heartbeat interval is left alone: its worker may not have beaten yet."""
    live = {(w.hostname, w.pid) for w in live_workers(session, heartbeat_s)}
    before = utcnow() - timedelta(seconds=heartbeat_s)
    starts = session.scalars(
        select(TaskStart)
        .join(Batch, Batch.id == TaskStart.batch_id)
        .where(TaskStart.handed_on_at.is_(None), TaskStart.started_at < before, Batch.status.in_(ACTIVE))
        .order_by(TaskStart.id)
    )
    return [start for start in starts if (start.hostname, start.pid) not in live]


def hand_on(session: Session, start_id: int) -> bool:
    """Claim the handing on of an orphaned start: true for exactly one caller (a conditional
    update), who then sends its batch on. Does not commit."""
    claimed = session.execute(
        update(TaskStart)
        .where(TaskStart.id == start_id, TaskStart.handed_on_at.is_(None))
        .values(handed_on_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(claimed.rowcount)  # type: ignore[attr-defined]
