"""unknown fates, lease renewal, reconciliation, turn retry hold-off

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 21:40:00

Messages: `attempt_started_at` (when the current or last send attempt began), `unsure_since`
(a previous attempt may have been accepted by Twilio since then: look it up before sending
again), `reconciled_at` (when the reconciliation job last asked Twilio for its status).
Conversations: `attempts` and `next_attempt_at`, so a start that keeps failing is bounded and the
sweep holds off re-enqueueing it (docs/ARCHITECTURE.md, invariants 2 and 8).
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempt_started_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('unsure_since', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('reconciled_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(), nullable=True))


def downgrade():
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('attempts')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('reconciled_at')
        batch_op.drop_column('unsure_since')
        batch_op.drop_column('attempt_started_at')
