"""What the CLI and the API use to put work on the queue and to check the broker."""

from __future__ import annotations

from celery import Celery

from qfedit.config import Settings
from worker.app import create_app

_apps: dict[str, Celery] = {}


def app_for(settings: Settings) -> Celery:
    """One app per broker configuration in this process (connections are pooled on it)."""
    key = settings.model_dump_json(include={"broker_url", "data_dir", "visibility_timeout", "queue_prefix"})
    if key not in _apps:
        _apps[key] = create_app(settings)
    return _apps[key]


def enqueue_batch(batch_id: int, settings: Settings) -> None:
    """Start a committed batch; sending it twice is harmless (the steps are idempotent)."""
    app_for(settings).send_task("qfedit.start_batch", args=[batch_id], queue="default")


def broker_reachable(settings: Settings, timeout: float = 2.0) -> bool:
    try:
        with app_for(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception:
        return False
    return True
