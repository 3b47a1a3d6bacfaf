"""Worker deaths and waits, visible: `task_starts` holds each task that started and has not
ended, so a task that keeps killing its worker fails its batch after `max_task_deliveries`
instead of being delivered forever; `batches.waiting` says what a batch's task is waiting for
(CPU cores held by other tasks).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_starts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=100), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_task_starts_batch_id_batches")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_starts")),
    )
    op.create_index(op.f("ix_task_starts_batch_id"), "task_starts", ["batch_id"])
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("waiting", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.drop_column("waiting")
    op.drop_index(op.f("ix_task_starts_batch_id"), table_name="task_starts")
    op.drop_table("task_starts")
