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


# plain ALTER TABLE (SQLite 3.35+ drops columns itself): a batch copy of images on SQLite cannot
# drop the table while the search index's triggers on captions refer to it ("table is locked")
def upgrade() -> None:
    op.add_column("images", sa.Column("name", sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column("images", "name")
