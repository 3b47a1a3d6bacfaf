"""Descriptions and tags on models and versions, and archived versions (as MLflow's registry has
them): `models.description`/`tags`, and `version_notes`, the editable part of a write-once
version row.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 17:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as table:
        table.add_column(sa.Column("description", sa.Text(), nullable=True))
        table.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "version_notes",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name=op.f("fk_version_notes_version_id_versions")
        ),
        sa.PrimaryKeyConstraint("version_id", name=op.f("pk_version_notes")),
    )


def downgrade() -> None:
    op.drop_table("version_notes")
    with op.batch_alter_table("models") as table:
        table.drop_column("tags")
        table.drop_column("description")
