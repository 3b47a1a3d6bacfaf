"""The app factory: `create_app(settings)` builds the engine, the routes and the limits.

Nothing happens at import; `qfedit api` (or a test) calls the factory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.console import pages as console
from api.generation import Generators
from api.limits import BodyLimit
from api.routes import aliases, audit, batches, facts, generate, health, models, versions
from qfedit.config import Settings
from qfedit.db.engine import engine_from_settings, session_factory

Enqueue = Callable[[int, Settings], None]
BrokerProbe = Callable[[Settings], bool]


def _default_enqueue(batch_id: int, settings: Settings) -> None:
    # Imported on first use: the API process needs Celery only to send tasks.
    from worker.client import enqueue_batch

    enqueue_batch(batch_id, settings)


def _default_broker_probe(settings: Settings) -> bool:
    from worker.client import broker_reachable

    return bool(broker_reachable(settings))


def create_app(
    settings: Settings,
    *,
    enqueue: Enqueue | None = None,
    broker_reachable: BrokerProbe | None = None,
) -> FastAPI:
    """The qfedit HTTP API over the database and store that `settings` name.

    `enqueue` and `broker_reachable` default to `worker.client`'s; a caller may pass others
    (an embedded runner, or a test recording what was sent).
    """
    engine = engine_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="qfedit",
        version="1",
        summary="Facts in, audited weight versions out.",
        description="Import facts, queue edit batches, audit versions and aliases, and spot-check "
        "generation. Every route but `/healthz` and `/readyz` needs a bearer token; writes need "
        "`write` scope and moving `production` needs `admin`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.enqueue_batch = enqueue or _default_enqueue
    app.state.broker_reachable = broker_reachable or _default_broker_probe
    app.state.generators = Generators(settings)
    errors.install(app)
    app.add_middleware(
        BodyLimit,
        limit=settings.api_max_body_bytes,
        upload_limit=settings.api_max_upload_bytes,
        upload_paths=facts.IMPORT_PATH,
    )
    for module in (health, models, facts, batches, versions, aliases, audit, generate):
        app.include_router(module.router)
    app.include_router(console.router)
    return app
