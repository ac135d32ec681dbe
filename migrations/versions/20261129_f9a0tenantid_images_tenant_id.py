"""images by tenant, newest first: the gallery's and the review queue's keyset pages

Revision ID: f9a0tenantid
Revises: e7f8websess1
Create Date: 2026-11-29 08:00:00.000000
"""
from alembic import op


revision = "f9a0tenantid"
down_revision = "e7f8websess1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # concurrently on PostgreSQL: a library of millions goes on taking uploads while it builds
    with op.get_context().autocommit_block():
        op.create_index("ix_images_tenant_id", "images", ["tenant", "id"], postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_images_tenant_id", table_name="images", postgresql_concurrently=True)
