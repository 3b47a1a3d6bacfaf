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
    """Serve the HTTP API (facts, batches, versions, aliases, audit log, generation)."""
    import uvicorn

    from api.app import create_app

    settings = get_settings()
    # Same check as every other command: the schema is at head (an empty embedded one is created).
    ready_engine().dispose()
    if not settings.api_tokens:
        errors.print(
            "[yellow]warning:[/yellow] no API tokens configured (QFEDIT_API_TOKENS); every request but "
            "/healthz and /readyz will be refused"
        )
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
