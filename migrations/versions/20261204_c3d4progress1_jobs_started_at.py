"""jobs.started_at: when the model forward holding a claimed job began, so progress shows the images
being captioned now rather than every image a worker has claimed

Revision ID: c3d4progress1
Revises: a1b2outbox01
Create Date: 2026-12-04 07:10:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = "c3d4progress1"
down_revision = "a1b2outbox01"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("started_at")
