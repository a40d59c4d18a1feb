"""scheduled sends and quiet hours: a message held in the database until a time

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 18:00:00

`messages.not_before`: a pending message is not claimed before it (its `send_at`, or the end of
the recipient's quiet hours; invariant 15), indexed for the release's check every few seconds.
`messages.send_at`: the time the backend asked for, kept to say why a message is held.
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('not_before', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('send_at', sa.DateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_messages_not_before'), ['not_before'], unique=False)


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_not_before'))
        batch_op.drop_column('send_at')
        batch_op.drop_column('not_before')
