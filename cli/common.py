"""What every command group shares: the consoles, options, the actor, JSON output, the database
session, and the one translation of errors into messages and exit statuses."""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session

from qfedit.config import get_settings
from qfedit.db import migrate
from qfedit.db.engine import engine_from_settings, session_factory

logger = logging.getLogger(__name__)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the width


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Model name.")]

T = TypeVar("T")


def current_actor() -> str:
    return os.environ.get("QFEDIT_ACTOR") or getpass.getuser()


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


@contextmanager
def user_errors() -> Iterator[None]:
    """An expected failure becomes one red line and the exit status of its code
    (`qfedit.errors.EXIT_CODES`); anything else is a bug and keeps its traceback."""
    from alembic.util.exc import CommandError
    from pydantic import ValidationError

    from qfedit.errors import EXIT_CODES, ErrorCode, QFEditError

    try:
        yield
    except QFEditError as err:
        errors.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        raise typer.Exit(EXIT_CODES[err.code]) from None
    except (CommandError, FileNotFoundError, IsADirectoryError, ValidationError) as err:
        # Refusals of what the user typed, from the libraries that read it.
        errors.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        raise typer.Exit(EXIT_CODES[ErrorCode.INVALID]) from None


def open_engine() -> Engine:
    return engine_from_settings(get_settings())


def ready_engine() -> Engine:
    """An engine on a database at the latest schema; an empty embedded SQLite is created on the spot."""
    engine = open_engine()
    if migrate.at_head(engine):  # the common case, without importing Alembic
        return engine
    current = migrate.current(engine)
    head = migrate.head()
    if current == head:
        return engine
    if current is None and engine.dialect.name == "sqlite" and not inspect(engine).get_table_names():
        logger.info("creating the embedded database at %s", engine.url)
        migrate.upgrade(engine)
        return engine
    raise typer.BadParameter(
        f"the database is at schema {current or 'none'}, not {head}; run `qfedit db upgrade`",
        param_hint="database",
    )


def in_session(work: Callable[[Session], T]) -> T:
    engine = ready_engine()
    try:
        with session_factory(engine)() as session, user_errors():
            return work(session)
    finally:
        engine.dispose()


def model_or_none(session: Session, name: str | None) -> Any:
    from qfedit import registry

    return registry.get_model(session, name) if name else None


def single_model(session: Session, name: str | None) -> Any:
    from qfedit import registry

    if name:
        return registry.get_model(session, name)
    models = registry.list_models(session)
    if len(models) != 1:
        names = ", ".join(m.name for m in models) or "none"
        raise registry.NotFoundError(f"pass --model (registered: {names})")
    return models[0]


def model_of_facts(session: Session, name: str | None, fact_ids: list[int]) -> Any:
    """The model `--model` names, else the one model the facts belong to: an id names its model."""
    from qfedit import registry
    from qfedit.errors import InvalidInputError

    if name:
        return registry.get_model(session, name)
    models = {registry.get_fact(session, fact_id).model for fact_id in fact_ids}
    if len(models) != 1:
        names = ", ".join(sorted(m.name for m in models)) or "none"
        raise InvalidInputError(
            f"the facts belong to several models ({names}): retract them per model with --model",
            field="fact_ids",
        )
    return models.pop()


# -- facts and gc ---------------------------------------------------------------------------


def when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
