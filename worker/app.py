"""The Celery application, built from settings on request (nothing is created at import).

Reliability settings, and why:
- `task_acks_late` + `task_reject_on_worker_lost`: a task is acknowledged only after it ran, so a
  worker killed mid-task (OOM, `kill -9`, preemption) leaves the message to be redelivered; every
  task is idempotent, so running it again finishes the work once.
- `worker_prefetch_multiplier = 1`: a GPU worker holds one message at a time and leaves the rest
  to idle workers.
- GPU work (capture, solve) goes to the `gpu` queue; bookkeeping to `default`.
- No result backend: the database holds every batch's state.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from celery.schedules import crontab

from qfedit.config import Settings

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"


def queue_names(settings: Settings) -> tuple[str, str]:
    """This deployment's `(default, gpu)` queues as the broker names them (QFEDIT_QUEUE_PREFIX)."""
    return settings.queue(DEFAULT_QUEUE), settings.queue(GPU_QUEUE)


def embedded_broker(data_dir: Path) -> tuple[str, dict[str, object]]:
    """A broker in the data folder: messages are files, so the CLI and a worker child can share it."""
    folder = (data_dir / "broker").resolve()
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    options: dict[str, object] = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        # Kombu's default is `control/` in the working directory.
        "control_folder": str(folder / "control"),
        "store_processed": "false",
        # A look at the folder every 0.1 s, not kombu's 1 s: each hop of a batch (start, capture,
        # solve) waited up to a second for it.
        "polling_interval": 0.1,
    }
    # The host is ignored by this transport; naming one keeps kombu from warning on every connection.
    return "filesystem://localhost/", options


def create_app(settings: Settings) -> Celery:
    app = Celery("qfedit")
    transport_options: dict[str, object]
    if settings.broker_url:
        timeout = settings.visibility_timeout
        # kombu looks for messages whose visibility ran out on every 10th sweep, 10 s apart: up to
        # 100 s after the timeout before a dead worker's task is delivered again. Every sweep
        # looks (one Redis scan), at most half the timeout apart.
        transport_options = {
            "visibility_timeout": timeout,
            "unacked_restore_interval": max(1, min(10, timeout // 2)),
            "unacked_restore_throttle": 1,
        }
        broker = settings.broker_url
    else:
        broker, transport_options = embedded_broker(settings.data_dir)
    hour, minute = (int(part) for part in settings.nightly_at.split(":"))
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue(DEFAULT_QUEUE),
        task_routes={
            "qfedit.capture_shard": {"queue": settings.queue(GPU_QUEUE)},
            "qfedit.solve_batch": {"queue": settings.queue(GPU_QUEUE)},
        },
        worker_hijack_root_logger=False,
        # Remote control lets anyone who reaches the broker query (`inspect conf`, `stats`) and
        # command (`shutdown`, `pool_restart`) every worker: off unless asked for.
        worker_enable_remote_control=settings.worker_remote_control,
        beat_schedule={
            "nightly-edits": {"task": "qfedit.nightly", "schedule": crontab(hour=hour, minute=minute)},
            "resend-stalled": {"task": "qfedit.resend_stalled", "schedule": settings.stall_after_s},
        },
        timezone="UTC",
    )
    # An attribute, not configuration: `inspect().conf()` replies with the configuration.
    app.qfedit_settings = settings  # type: ignore[attr-defined]
    # Registers the tasks on this app; a worker started from it keeps a heartbeat row.
    from worker import tasks
    from worker.heartbeat import Heartbeat

    app.steps["worker"].add(Heartbeat)

    tasks.register(app)
    return app
