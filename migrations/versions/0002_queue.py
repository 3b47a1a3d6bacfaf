"""Queue: batch kind and parent, capture shards, captured observations per fact, model line.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 04:43:27.804321
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _status(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "batch_shards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("fact_ids", sa.JSON(), nullable=False),
        sa.Column("status", _status("shard_status", "pending", "done"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_batch_shards_batch_id_batches")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_shards")),
        sa.UniqueConstraint("batch_id", "number", name=op.f("uq_batch_shards_batch_id_number")),
    )
    op.create_index(op.f("ix_batch_shards_batch_id"), "batch_shards", ["batch_id"], unique=False)
    op.create_table(
        "fact_captures",
        sa.Column("fact_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("object_path", sa.String(length=500), nullable=False),
        sa.Column("object_sha256", sa.String(length=64), nullable=False),
        sa.Column("positions", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["fact_id"], ["facts.id"], name=op.f("fk_fact_captures_fact_id_facts")),
        sa.PrimaryKeyConstraint("fact_id", "layer", "fingerprint", name=op.f("pk_fact_captures")),
    )
    with op.batch_alter_table("batches") as batch_op:
        # Existing batches were all edits.
        batch_op.add_column(
            sa.Column("kind", _status("batch_kind", "edit", "retract"), nullable=False, server_default="edit")
        )
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("parent_version_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_batches_parent_version_id_versions"), "versions", ["parent_version_id"], ["id"]
        )
    with op.batch_alter_table("versions") as batch_op:
        batch_op.add_column(sa.Column("statistics_path", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("statistics_sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("models") as batch_op:
        batch_op.add_column(sa.Column("settings", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("active_batch_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch_op:
        batch_op.drop_column("statistics_sha256")
        batch_op.drop_column("statistics_path")
    with op.batch_alter_table("models") as batch_op:
        batch_op.drop_column("active_batch_id")
        batch_op.drop_column("settings")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_constraint(op.f("fk_batches_parent_version_id_versions"), type_="foreignkey")
        batch_op.drop_column("parent_version_id")
        batch_op.drop_column("reason")
        # SQLite's table rebuild keeps named CHECKs, which would then name a missing column.
        batch_op.drop_constraint(op.f("ck_batches_batch_kind"), type_="check")
        batch_op.drop_column("kind")
    op.drop_index(op.f("ix_batch_shards_batch_id"), table_name="batch_shards")
    op.drop_table("fact_captures")
    op.drop_table("batch_shards")
