"""The `qfedit` command line. Each submodule adds its commands to `app`."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Closed-form fact editing of LLM weights.")


def main() -> None:
    # Imported here, not at module import, so `import qfedit.cli` stays cheap.
    from qfedit.cli import engine  # noqa: F401

    app()
