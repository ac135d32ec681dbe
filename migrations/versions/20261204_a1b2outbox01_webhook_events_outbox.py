"""webhook events outbox (written with the job's end, delivered and marked by the webhook worker);
jobs' error history (kept when an operator retries a failed job) and the batch sizes that isolate a
poison image

Revision ID: a1b2outbox01
Revises: a1b2sessgen1
Create Date: 2026-12-04 04:30:00.000000
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = "a1b2outbox01"
down_revision = "a1b2sessgen1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'given_up')", name=op.f("ck_webhook_events_status")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_webhook_events_job_id_jobs"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_events_job_id"), ["job_id"], unique=False)
        batch_op.create_index("ix_webhook_events_status_due_at", ["status", "due_at"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_history", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                                      nullable=True))
        batch_op.add_column(sa.Column("claim_size", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("batch_limit", sa.Integer(), nullable=True))


def downgrade() -> None:
    # pending events would be lost: deliver them first (the sweep re-sends them), or accept that
    op.drop_table("webhook_events")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("batch_limit")
        batch_op.drop_column("claim_size")
        batch_op.drop_column("error_history")
