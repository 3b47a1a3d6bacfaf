"""Worker heartbeats: who is consuming which queues, by the time they were last seen."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from qfedit.db.models import WorkerHeartbeat

MISSED_BEATS = 3
"""A worker not seen for this many heartbeat intervals is taken for gone (killed workers never
say goodbye); the interval is `Settings.heartbeat_s`."""


def heartbeat(session: Session, *, hostname: str, queues: list[str], pid: int) -> None:
    """Record that `hostname` is alive and consuming `queues` now."""
    now = datetime.now(timezone.utc)
    row = session.get(WorkerHeartbeat, hostname)
    if row is None:
        session.add(
            WorkerHeartbeat(hostname=hostname, queues=",".join(queues), pid=pid, started_at=now, seen_at=now)
        )
    else:
        row.queues, row.pid, row.seen_at = ",".join(queues), pid, now


def forget_worker(session: Session, hostname: str) -> None:
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == hostname))


def live_within_s(heartbeat_s: float) -> float:
    """How long a worker beating every `heartbeat_s` may go unseen and still count as live."""
    return MISSED_BEATS * heartbeat_s


def live_workers(session: Session, heartbeat_s: float) -> list[WorkerHeartbeat]:
    """Workers seen within `live_within_s(heartbeat_s)`, by name."""
    since = datetime.now(timezone.utc) - timedelta(seconds=live_within_s(heartbeat_s))
    query = select(WorkerHeartbeat).where(WorkerHeartbeat.seen_at >= since).order_by(WorkerHeartbeat.hostname)
    return list(session.scalars(query))


def listening(workers: list[WorkerHeartbeat], queue: str) -> list[str]:
    """The names of the workers consuming `queue`."""
    return [w.hostname for w in workers if queue in w.queues.split(",")]
