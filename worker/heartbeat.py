"""A worker step that keeps this worker's heartbeat row (`qfedit.registry.workers`) fresh, so that
`batch submit` and `qfedit doctor` can say whether anyone consumes a queue, and hands on the tasks
of workers whose heartbeat stopped: a batch whose worker was killed goes on within a minute,
without waiting for the broker's visibility timeout or beat's stall scan."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import bootsteps

from qfedit import registry
from qfedit.db import engine_from_settings, session_factory
from qfedit.pipeline import deliveries

log = logging.getLogger(__name__)


class Heartbeat(bootsteps.StartStopStep):
    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        settings = worker.app.qfedit_settings
        queues = sorted(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        # Its own engine: the tasks' runtime is made lazily in this process and must not wait on it.
        engine = engine_from_settings(settings)
        sessions = session_factory(engine)

        def beat(forget: bool = False) -> None:
            try:
                with sessions() as session:
                    if forget:
                        registry.forget_worker(session, worker.hostname)
                    else:
                        registry.heartbeat(session, hostname=worker.hostname, queues=queues, pid=os.getpid())
                    session.commit()
            except Exception as err:  # a missed beat is not worth a worker: the next one may land
                log.warning("worker heartbeat not written: %s", err)

        def hand_on() -> None:
            try:
                with sessions() as session:
                    for start in deliveries.orphaned(session, settings.heartbeat_s):
                        if not deliveries.hand_on(session, start.id):
                            continue
                        session.commit()
                        log.warning(
                            "batch %d: %s was running on %s (pid %d), whose heartbeat stopped: sent on",
                            start.batch_id,
                            deliveries.task_label(start.task),
                            start.hostname,
                            start.pid,
                        )
                        worker.app.send_task("qfedit.start_batch", args=[start.batch_id])
            except Exception as err:  # the next beat looks again, and beat's stall scan remains
                log.warning("dead workers' tasks not handed on: %s", err)

        def run() -> None:
            beat()
            while not self._stopping.wait(settings.heartbeat_s):
                beat()
                hand_on()
            beat(forget=True)
            engine.dispose()

        self._thread = threading.Thread(target=run, name="qfedit-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
