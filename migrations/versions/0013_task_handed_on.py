"""A dead worker's tasks are handed on from its heartbeat: `task_starts.handed_on_at` records that
a live worker found the start's worker gone and sent its batch on, so it is sent once.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_starts") as table:
        table.add_column(sa.Column("handed_on_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task_starts") as table:
        table.drop_column("handed_on_at")
