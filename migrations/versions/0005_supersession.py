"""Supersession: facts that state a new answer to a question the model line already has.

`question_key` (a digest of the normalised question) finds them; `superseded_by_id` on the older
fact names the one that replaces it. Existing rows get their key here.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 02:30:00
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key(question: str) -> str:
    # Written out rather than imported, so this revision keeps meaning what it meant.
    normal = " ".join(question.casefold().split()).rstrip("?.!;: ")
    return hashlib.sha256(normal.encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("facts") as table:
        table.add_column(sa.Column("question_key", sa.String(length=64), nullable=True))
        table.add_column(sa.Column("superseded_by_id", sa.Integer(), nullable=True))
        table.create_foreign_key("fk_facts_superseded_by_id_facts", "facts", ["superseded_by_id"], ["id"])
        table.create_index("ix_facts_model_id_question_key", ["model_id", "question_key"])
    bind = op.get_bind()
    facts = sa.table("facts", sa.column("id", sa.Integer), sa.column("question", sa.Text), sa.column("question_key", sa.String))
    last = 0
    while True:
        rows = bind.execute(
            sa.select(facts.c.id, facts.c.question).where(facts.c.id > last).order_by(facts.c.id).limit(5000)
        ).all()
        if not rows:
            break
        for fact_id, question in rows:
            bind.execute(sa.update(facts).where(facts.c.id == fact_id).values(question_key=_key(question)))
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table("facts") as table:
        table.drop_index("ix_facts_model_id_question_key")
        table.drop_constraint("fk_facts_superseded_by_id_facts", type_="foreignkey")
        table.drop_column("superseded_by_id")
        table.drop_column("question_key")
