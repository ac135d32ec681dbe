"""alt-text decisions, webhook callbacks and deliveries

Revision ID: d5e6alttext1
Revises: c3a4auth0001
Create Date: 2026-11-27 04:55:19.268860
"""
from alembic import op
import sqlalchemy as sa

from captioner.migrations import refuse_to_drop


revision = 'd5e6alttext1'
down_revision = "c3a4auth0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('alt_text_decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.Column('decided_by', sa.String(length=200), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('approved', 'edited', 'decorative')", name=op.f('ck_alt_text_decisions_state')),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_alt_text_decisions_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alt_text_decisions'))
    )
    with op.batch_alter_table('alt_text_decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alt_text_decisions_image_id'), ['image_id'], unique=False)

    op.create_table('webhook_deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_webhook_deliveries_job_id_jobs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries'))
    )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhook_deliveries_event_id'), ['event_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_webhook_deliveries_job_id'), ['job_id'], unique=False)

    with op.batch_alter_table('batch_images', schema=None) as batch_op:
        batch_op.create_index('ix_batch_images_image_id', ['image_id'], unique=False)

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('callback_url', sa.Text(), nullable=True))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('callback_url', sa.Text(), nullable=True))



def downgrade() -> None:
    refuse_to_drop(revision)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('callback_url')

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_column('callback_url')

    with op.batch_alter_table('batch_images', schema=None) as batch_op:
        batch_op.drop_index('ix_batch_images_image_id')

    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_deliveries_job_id'))
        batch_op.drop_index(batch_op.f('ix_webhook_deliveries_event_id'))

    op.drop_table('webhook_deliveries')
    with op.batch_alter_table('alt_text_decisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alt_text_decisions_image_id'))

    op.drop_table('alt_text_decisions')
