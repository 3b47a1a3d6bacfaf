"""The `qfedit` command and its groups; each module of `cli` adds its commands to them."""

from __future__ import annotations

import typer

# Plain click help: typer's rich help labels every flag `<bool>`, as if it took a value.
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="Closed-form fact editing of LLM weights.",
)


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the engine does."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error."),
) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


db_app = typer.Typer(no_args_is_help=True, help="Database schema: migrations.")
model_app = typer.Typer(no_args_is_help=True, help="Register, configure and list base models.")
alias_app = typer.Typer(no_args_is_help=True, help="Movable names for versions, with their history.")
batch_app = typer.Typer(no_args_is_help=True, help="Edit batches: submit, follow, cancel.")
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
app.add_typer(alias_app, name="alias")
app.add_typer(batch_app, name="batch")
