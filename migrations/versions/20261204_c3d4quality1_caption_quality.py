"""captions' quality: the estimated probability that the caption is right, null for captions
written by a model without a fitted estimator (every caption before this revision); the review
queue's index, in its order (core/browse.py)

Revision ID: c3d4quality1
Revises: a1b2outbox01
Create Date: 2026-12-04 07:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = "c3d4quality1"
down_revision = "a1b2outbox01"
branch_labels = None
depends_on = None


# plain ALTER TABLE, no batch mode: SQLite (3.35+) adds and drops a column in place, whereas a
# batch copy of captions would drop the triggers that keep its search index (b1d2search01)
def upgrade() -> None:
    op.add_column("captions", sa.Column("quality", sa.Float(), nullable=True))
    op.create_index("ix_captions_review", "captions",
                    [sa.text("(quality IS NULL)"), sa.text("coalesce(quality, confidence)"), "image_id"],
                    postgresql_where=sa.text("needs_review"),
                    sqlite_where=sa.text("needs_review = 1"))  # as SQLAlchemy writes the queue's filter there


def downgrade() -> None:
    op.drop_index("ix_captions_review", table_name="captions")
    op.drop_column("captions", "quality")
