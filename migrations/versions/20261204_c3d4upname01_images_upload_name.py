"""images.name: the file name an upload was sent with (sanitised, never a path), shown as the
image's source and export key instead of its content-addressed storage key

Revision ID: c3d4upname01
Revises: c3d4liveness
Create Date: 2026-12-04 07:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = "c3d4upname01"
down_revision = "c3d4liveness"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("name")
