"""Versions, version fact sets, alias moves and audit entries cannot be changed or deleted."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, delete, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.db import AliasMove, AuditEntry, ImmutableRowError, Version, VersionFact

from .helpers import add_facts, add_model


@pytest.fixture
def history(session: Session) -> Session:
    model = add_model(session)
    fact_ids = add_facts(session, model, 2)
    version = registry.record_version(
        session,
        model=model,
        fact_ids=fact_ids,
        created_by="alice",
        reason="two facts",
        checkpoint=None,
        layer=1,
        rule="preserving",
    )
    registry.set_alias(session, name="production", version=version, reason="ship", actor="alice")
    session.commit()
    return session


def test_orm_update_of_a_version_is_refused(history: Session) -> None:
    version = history.query(Version).filter_by(number=1).one()
    version.reason = "rewritten history"
    with pytest.raises(ImmutableRowError, match="versions rows are immutable"):
        history.flush()
    history.rollback()
    assert history.query(Version).filter_by(number=1).one().reason == "two facts"


def test_orm_update_and_delete_of_an_audit_entry_are_refused(history: Session) -> None:
    entry = history.query(AuditEntry).first()
    assert entry is not None
    entry.actor = "mallory"
    with pytest.raises(ImmutableRowError, match="audit_log"):
        history.flush()
    history.rollback()
    history.delete(history.query(AuditEntry).first())
    with pytest.raises(ImmutableRowError, match="audit_log"):
        history.flush()


@pytest.mark.parametrize("model", [Version, VersionFact, AliasMove, AuditEntry])
def test_bulk_update_and_delete_through_the_session_are_refused(history: Session, model: type) -> None:
    with pytest.raises(ImmutableRowError, match="bulk update"):
        history.execute(update(model).values({next(iter(model.__table__.primary_key.columns)).name: 999}))
    with pytest.raises(ImmutableRowError, match="bulk delete"):
        history.execute(delete(model))


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE versions SET reason = 'x'",
        "DELETE FROM versions WHERE number = 1",
        "UPDATE version_facts SET fact_id = fact_id",
        "DELETE FROM version_facts",
        "UPDATE alias_moves SET reason = 'x'",
        "DELETE FROM alias_moves",
        "UPDATE audit_log SET actor = 'mallory'",
        "DELETE FROM audit_log",
    ],
)
def test_raw_sql_is_refused_by_the_database(history: Session, engine: Engine, statement: str) -> None:
    # Plain SQL on its own connection: no ORM events, only the database's triggers stand in the way.
    with pytest.raises(DBAPIError, match="immutable"), engine.begin() as connection:
        connection.execute(text(statement))


@pytest.mark.backends("postgresql")  # SQLite has no TRUNCATE
def test_truncate_of_the_audit_log_is_refused_on_postgresql(history: Session, engine: Engine) -> None:
    with pytest.raises(DBAPIError, match="immutable"), engine.begin() as connection:
        connection.execute(text("TRUNCATE audit_log"))


def test_mutable_tables_stay_mutable(history: Session, engine: Engine) -> None:
    # The guard must not over-reach: facts change status and batches advance.
    with engine.begin() as connection:
        connection.execute(text("UPDATE facts SET status = 'applied'"))
    assert set(registry.count_facts(history)) == {"applied"}
