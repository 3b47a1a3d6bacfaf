"""Unteachable facts: what the model answers with a fact in context (and without it), recorded at
capture, and the facts a batch left out of its version because of it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 02:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fact_captures") as table:
        table.add_column(sa.Column("context_answer", sa.Text(), nullable=True))
        table.add_column(sa.Column("teachable", sa.Boolean(), nullable=True))
        table.add_column(sa.Column("base_answer", sa.Text(), nullable=True))
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("excluded_facts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.drop_column("excluded_facts")
    with op.batch_alter_table("fact_captures") as table:
        table.drop_column("base_answer")
        table.drop_column("teachable")
        table.drop_column("context_answer")
