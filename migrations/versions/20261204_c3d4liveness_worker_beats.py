"""Worker heartbeats, and an index for queue depth and the oldest queued job per queue

Revision ID: c3d4liveness
Revises: c3d4quality1
Create Date: 2026-12-04 07:10:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = "c3d4liveness"
down_revision = "c3d4quality1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_beats",
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("runtime", sa.String(length=16), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_beat", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("hostname", "pid", name=op.f("pk_worker_beats")),
    )
    op.create_index("ix_jobs_queued_queue_created_at", "jobs", ["queue", "created_at"], unique=False,
                    postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"))


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_queue_created_at", table_name="jobs",
                  postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"))
    op.drop_table("worker_beats")
