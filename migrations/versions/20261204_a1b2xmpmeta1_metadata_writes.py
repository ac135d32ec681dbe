"""XMP metadata: the batch option write_metadata, and the files captioner embedded captions into

Revision ID: a1b2xmpmeta1
Revises: f9a0tenantid
Create Date: 2026-12-04 04:30:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = "a1b2xmpmeta1"
down_revision = "f9a0tenantid"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("write_metadata", sa.String(length=16), nullable=True))
    op.create_table(
        "metadata_writes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_metadata_writes_image_id_images"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metadata_writes")),
    )
    op.create_index(op.f("ix_metadata_writes_sha256"), "metadata_writes", ["sha256"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_metadata_writes_sha256"), table_name="metadata_writes")
    op.drop_table("metadata_writes")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("write_metadata")
