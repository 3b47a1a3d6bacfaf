"""The `qfedit` command line. Each submodule adds its commands to `app`."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Closed-form fact editing of LLM weights.")


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the engine does."),
) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def get_app() -> typer.Typer:
    """The app with every command registered; the submodules are imported here, not at import."""
    from qfedit.cli import api, engine, serving, state  # noqa: F401

    # The CLI is where the engine meets the queue; `qfedit.*` below the CLI never imports Celery.
    from worker import cli as worker_cli  # noqa: F401

    return app


def main() -> None:
    get_app()()
