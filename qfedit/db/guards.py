"""Write-once tables: versions, their fact sets, alias moves and the audit log.

Two layers, because either alone has a gap: the ORM events stop application code early with a
clear error (including bulk `update()`/`delete()` through a Session), and the database triggers
stop everything else (raw SQL, another client, a future bug that bypasses the ORM).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table, event, text
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction

from qfedit.db.models import IMMUTABLE_MODELS, Base
from qfedit.errors import ConflictError

IMMUTABLE_TABLES: tuple[str, ...] = tuple(str(model.__tablename__) for model in IMMUTABLE_MODELS)
_GUARD_FUNCTION = "qfedit_forbid_change"


class ImmutableRowError(ConflictError):
    """An attempt to change or delete a row that is written once (a version, an audit entry, ...)."""


def _check_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    for obj in session.dirty:
        if isinstance(obj, IMMUTABLE_MODELS) and session.is_modified(obj, include_collections=False):
            raise ImmutableRowError(
                f"{type(obj).__tablename__} rows are immutable; refusing to update {obj!r}"
            )
    for obj in session.deleted:
        if isinstance(obj, IMMUTABLE_MODELS):
            raise ImmutableRowError(
                f"{type(obj).__tablename__} rows are immutable; refusing to delete {obj!r}"
            )


def _check_bulk(state: ORMExecuteState) -> None:
    if not (state.is_update or state.is_delete):
        return
    mapper = state.bind_mapper
    if mapper is not None and issubclass(mapper.class_, IMMUTABLE_MODELS):
        verb = "update" if state.is_update else "delete"
        raise ImmutableRowError(f"{mapper.class_.__tablename__} rows are immutable; refusing bulk {verb}")


def install_session_guards() -> None:
    """Register the ORM checks on every Session; idempotent."""
    if not event.contains(Session, "before_flush", _check_flush):
        event.listen(Session, "before_flush", _check_flush)
    if not event.contains(Session, "do_orm_execute", _check_bulk):
        event.listen(Session, "do_orm_execute", _check_bulk)


def trigger_ddl(dialect: str) -> list[str]:
    """SQL that makes the database itself refuse updates and deletes of write-once rows."""
    statements: list[str] = []
    if dialect == "postgresql":
        statements.append(
            f"CREATE OR REPLACE FUNCTION {_GUARD_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'qfedit: % rows are immutable (% refused)', TG_TABLE_NAME, TG_OP "
            "USING ERRCODE = 'restrict_violation'; END $$"
        )
        for table in IMMUTABLE_TABLES:
            statements.append(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {_GUARD_FUNCTION}()"
            )
            # TRUNCATE skips row triggers, so it needs its own statement-level one.
            statements.append(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {_GUARD_FUNCTION}()"
            )
    elif dialect == "sqlite":
        for table in IMMUTABLE_TABLES:
            for op in ("UPDATE", "DELETE"):
                statements.append(
                    f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'qfedit: {table} rows are immutable ({op} refused)'); END"
                )
        statements.extend(sqlite_no_replace_ddl())
    else:
        raise ValueError(f"no immutability triggers for database dialect {dialect!r} (sqlite or postgresql)")
    return statements


def unique_keys(table: str) -> list[tuple[str, ...]]:
    """Every column set of `table` that identifies a row: its primary key and unique constraints."""
    from sqlalchemy import UniqueConstraint

    found = Base.metadata.tables[table]
    keys = [tuple(column.name for column in found.primary_key.columns)]
    keys += [
        tuple(column.name for column in constraint.columns)
        for constraint in found.constraints
        if isinstance(constraint, UniqueConstraint)
    ]
    return keys


def sqlite_no_replace_ddl(keys: dict[str, list[tuple[str, ...]]] | None = None) -> list[str]:
    """SQLite's `INSERT OR REPLACE` deletes the row in the way without firing delete triggers
    (unless `recursive_triggers` is on, a per-connection setting no other client need share), so
    an insert that would collide with a write-once row is refused before it gets that far."""
    statements = []
    for table in IMMUTABLE_TABLES:
        for key in (keys or {}).get(table) or unique_keys(table):
            match = " AND ".join(f"{column} = NEW.{column}" for column in key)
            statements.append(
                f"CREATE TRIGGER {table}_no_replace_{'_'.join(key)} BEFORE INSERT ON {table} "
                f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {match}) "
                f"BEGIN SELECT RAISE(ABORT, 'qfedit: {table} rows are immutable (REPLACE refused)'); END"
            )
    return statements


def _after_create(target: Any, connection: Connection, **kw: Any) -> None:
    # `metadata.create_all` (tests, throwaway databases) gets the same triggers as the migration.
    tables = {table.name for table in kw.get("tables", []) if isinstance(table, Table)}
    if tables and not set(IMMUTABLE_TABLES) <= tables:
        return
    for statement in trigger_ddl(connection.dialect.name):
        connection.execute(text(statement))


# Registering listeners touches no database or file; it makes the guards impossible to forget.
install_session_guards()
if not event.contains(Base.metadata, "after_create", _after_create):
    event.listen(Base.metadata, "after_create", _after_create)
