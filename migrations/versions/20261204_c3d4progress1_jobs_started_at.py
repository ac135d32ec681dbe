"""jobs.started_at: when the model forward holding a claimed job began, so progress shows the images
being captioned now rather than every image a worker has claimed

Revision ID: c3d4progress1
Revises: c3d4upname01
Create Date: 2026-12-04 07:10:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = "c3d4progress1"
down_revision = "c3d4upname01"
branch_labels = None
depends_on = None


# plain ALTER TABLE (SQLite 3.35+ drops columns itself): a batch copy of jobs on SQLite would have
# to rebuild its indexes, the partial one for queue depth among them
def upgrade() -> None:
    op.add_column("jobs", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "started_at")
