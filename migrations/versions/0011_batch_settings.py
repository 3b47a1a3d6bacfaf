"""A batch's settings are resolved once, at submission: `batches.settings` holds the model's
settings with the batch's overrides over them (nested form), and every step, view and version
reads that, so configuring a model during a batch no longer changes what the batch solves with.

Existing batches are resolved here, once, from their model's settings as they are now (the
closest record there is of what they ran with); a batch whose settings do not validate keeps
NULL and says so when read (`qfedit.pipeline.settings.batch_settings`).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from qfedit.errors import QFEditError
    from qfedit.pipeline.settings import resolve

    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("settings", sa.JSON(), nullable=True))
    batches = sa.table(
        "batches",
        sa.column("id", sa.Integer),
        sa.column("model_id", sa.Integer),
        sa.column("hyperparameters", sa.JSON),
        sa.column("settings", sa.JSON),
    )
    models = sa.table(
        "models", sa.column("id", sa.Integer), sa.column("settings", sa.JSON), sa.column("default_layer", sa.Integer)
    )
    connection = op.get_bind()
    stored = {
        row.id: (row.settings, row.default_layer)
        for row in connection.execute(sa.select(models.c.id, models.c.settings, models.c.default_layer))
    }
    rows = connection.execute(sa.select(batches.c.id, batches.c.model_id, batches.c.hyperparameters)).all()
    for row in rows:
        settings, default_layer = stored[row.model_id]
        try:
            resolved = resolve(settings, row.hyperparameters, default_layer=default_layer)
        except QFEditError:
            continue
        connection.execute(
            batches.update().where(batches.c.id == row.id).values(settings=resolved.model_dump(mode="json"))
        )


def downgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.drop_column("settings")
