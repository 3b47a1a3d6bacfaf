"""What a batch's task is doing within its status (`batches.activity`: "solving layer 24 (5 of
10)", "evaluating: paraphrases"), so progress says where a long solve or evaluation is.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("activity", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.drop_column("activity")
