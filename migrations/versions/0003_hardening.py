"""Hardening: a batch remembers the request its idempotency key was first used for; SQLite
refuses `INSERT OR REPLACE` over write-once rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than read from the models, so this revision keeps meaning what it meant.
_KEYS: dict[str, list[tuple[str, ...]]] = {
    "versions": [("id",), ("model_id", "number")],
    "version_facts": [("version_id", "fact_id")],
    "alias_moves": [("id",)],
    "audit_log": [("id",)],
}


def _trigger(table: str, key: tuple[str, ...]) -> str:
    return f"{table}_no_replace_{'_'.join(key)}"


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("request_digest", sa.String(length=64), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        for table, keys in _KEYS.items():
            for key in keys:
                match = " AND ".join(f"{column} = NEW.{column}" for column in key)
                op.execute(
                    f"CREATE TRIGGER {_trigger(table, key)} BEFORE INSERT ON {table} "
                    f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {match}) "
                    f"BEGIN SELECT RAISE(ABORT, 'qfedit: {table} rows are immutable (REPLACE refused)'); END"
                )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table, keys in _KEYS.items():
            for key in keys:
                op.execute(f"DROP TRIGGER IF EXISTS {_trigger(table, key)}")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("request_digest")
