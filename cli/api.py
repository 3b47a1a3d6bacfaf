"""`qfedit api`: the HTTP API under uvicorn (FastAPI stays out of `qfedit`: imported in the command)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.app import app
from cli.common import errors, ready_engine
from qfedit.config import get_settings


@app.command("api")
def api_command(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve the HTTP API (facts, batches, versions, aliases, audit log, generation).

    Tokens: QFEDIT_API_TOKENS='{"ci": {"token": "<32+ random characters>", "scope": "write"}}'
    (scopes read, write, admin; `openssl rand -hex 32` makes one). On the embedded default (no
    QFEDIT_BROKER_URL) a worker child runs the batches posted here, as `batch submit` does."""
    import uvicorn

    from api.app import create_app
    from cli.queue import embedded_worker

    settings = get_settings()
    # Same check as every other command: the schema is at head (an empty embedded one is created).
    ready_engine().dispose()
    if not settings.api_tokens:
        errors.print(
            "[yellow]warning:[/yellow] no API tokens configured (QFEDIT_API_TOKENS); every request but "
            "/healthz and /readyz will be refused"
        )
    # Embedded: without a worker, batches posted here would be accepted and never run.
    with embedded_worker(settings) as child:
        if child is not None:
            errors.print(
                f"embedded default: a worker child runs the posted batches (log {settings.data_dir / 'worker.log'})",
                highlight=False,
            )
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
