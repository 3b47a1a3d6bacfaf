"""The model each audit entry is about (`audit_log.model_id`), so the log filters by model with
an index rather than by resolving every object id. Entries written before are filled in from
the objects they name; a fact entry names its facts by id, the first of which gives the model.

This is the one change ever made to existing audit rows: the write-once trigger on `audit_log`
is lifted for the fill and put back in the same transaction.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 08:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_GUARD = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'qfedit: audit_log rows are immutable (UPDATE refused)'); END"
)


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("model_id", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_audit_log_model_id"), "audit_log", ["model_id"])
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_immutable")
        first_id = "split_part(audit_log.object_id, ',', 1)"
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        first_id = "substr(audit_log.object_id, 1, instr(audit_log.object_id || ',', ',') - 1)"
    op.execute(
        "UPDATE audit_log SET model_id = CAST(object_id AS INTEGER) "
        "WHERE object_type = 'model' AND "
        + ("object_id ~ '^[0-9]+$'" if dialect == "postgresql" else "object_id NOT GLOB '*[^0-9]*'")
    )
    for kind, table in (("batch", "batches"), ("version", "versions"), ("alias", "aliases")):
        op.execute(
            f"UPDATE audit_log SET model_id = (SELECT {table}.model_id FROM {table} "
            f"WHERE CAST({table}.id AS VARCHAR(64)) = audit_log.object_id) WHERE object_type = '{kind}'"
        )
    op.execute(
        "UPDATE audit_log SET model_id = (SELECT facts.model_id FROM facts "
        f"WHERE CAST(facts.id AS VARCHAR(64)) = {first_id}) WHERE object_type = 'fact'"
    )
    if dialect == "postgresql":
        op.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_immutable")
    else:
        op.execute(_SQLITE_GUARD)


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_log_model_id"), table_name="audit_log")
    op.drop_column("audit_log", "model_id")
