"""api keys and tenant buckets: who may call the API, and which S3 locations each tenant may read

Revision ID: c3a4auth0001
Revises: b1d2search01
Create Date: 2026-11-27 04:55:50.902014
"""
from alembic import op
import sqlalchemy as sa

from captioner.migrations import refuse_to_drop


revision = 'c3a4auth0001'
down_revision = "b1d2search01"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix'))
    )
    op.create_table('tenant_buckets',
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('bucket', sa.String(length=255), nullable=False),
    sa.Column('prefix', sa.String(length=1024), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant', 'bucket', 'prefix', name=op.f('pk_tenant_buckets'))
    )


def downgrade() -> None:
    refuse_to_drop(revision)
    op.drop_table('tenant_buckets')
    op.drop_table('api_keys')
