"""An index on facts (model_id, external_id): supersession looks facts up by external id in every
import chunk, and without it each lookup scanned the model's facts.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 05:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_facts_model_id_external_id", "facts", ["model_id", "external_id"])


def downgrade() -> None:
    op.drop_index("ix_facts_model_id_external_id", table_name="facts")
