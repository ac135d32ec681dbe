"""service secrets: the web interface's session-signing key, shared by every API process

Revision ID: e7f8websess1
Revises: d5e6alttext1
Create Date: 2026-11-28 08:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = 'e7f8websess1'
down_revision = "d5e6alttext1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('service_secrets',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_service_secrets'))
    )


def downgrade() -> None:
    op.drop_table('service_secrets')
