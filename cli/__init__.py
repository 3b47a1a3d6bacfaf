"""The `qfedit` command line: the one place that composes the engine (`qfedit`), the queue
(`worker`) and the HTTP service (`api`). `qfedit` itself imports none of them.

    app.py      the command and its groups
    common.py   what every command shares: consoles, options, sessions, error translation
    engine.py   edit, ask, eval, layers on a local model directory
    state.py    db, model (add, list, configure), import, facts
    history.py  versions, show, diff, log, alias, gc
    queue.py    worker, beat, batch, retract
    demo.py     the demo: the shipped model edited end to end
    serving.py  serve, export
    api.py      the HTTP API under uvicorn
"""

from __future__ import annotations

import typer


def get_app() -> typer.Typer:
    """The app with every command registered; the modules are imported here, not at import."""
    from cli import api, demo, engine, history, queue, serving, state  # noqa: F401
    from cli.app import app

    return app


def main() -> None:
    get_app()()
