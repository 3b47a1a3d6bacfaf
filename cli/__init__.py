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
    doctor.py   doctor: checks of what batches need
"""

from __future__ import annotations

import typer


def get_app() -> typer.Typer:
    """The app with every command registered; the modules are imported here, not at import."""
    from cli import api, demo, doctor, engine, history, queue, serving, state  # noqa: F401
    from cli.app import app

    return app


def main() -> None:
    """The console script: a bad setting or an unexpected error is one line (`--debug` keeps the
    traceback); what commands refuse is already one line (`cli.common.user_errors`)."""
    import sys

    from pydantic import ValidationError

    debug = "--debug" in sys.argv[1:]
    try:
        get_app()()
    except ValidationError as error:
        if debug or error.title != "Settings":
            raise
        sys.stderr.write(f"error: {settings_error(error)}\n")
        raise SystemExit(2) from None
    except Exception as error:
        if debug:
            raise
        sys.stderr.write(
            f"error: internal error ({type(error).__name__}: {error}); run again with --debug for the traceback\n"
        )
        raise SystemExit(1) from None


def settings_error(error: object) -> str:
    """`setting QFEDIT_API_TOKENS (ci.token): a token needs ...`: the variable and the reason, never
    the value (it may be a secret)."""
    first = error.errors()[0]  # type: ignore[attr-defined]
    parts = [str(part) for part in first["loc"]]
    where = f" ({'.'.join(parts[1:])})" if len(parts) > 1 else ""
    reason = str(first["msg"]).removeprefix("Value error, ")
    return f"setting QFEDIT_{parts[0].upper() if parts else '?'}{where}: {reason}"
