"""api_keys.session_generation: signing out of the web interface ends every copy of the session

Revision ID: a1b2sessgen1
Revises: a1b2xmpmeta1
Create Date: 2026-12-04 04:45:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = "a1b2sessgen1"
down_revision = "a1b2xmpmeta1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("session_generation", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("session_generation")
