"""events to the backend, human handoff, the backend's metadata

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 22:00:00

The events table (invariant 12: written with the change it reports, delivered at least once,
readable and replayable), a contact's handoff to a person, and the backend's `metadata` on
messages and conversations (echoed in their events).
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('events',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('type', sa.String(length=40), nullable=False),
    sa.Column('contact_id', sa.Integer(), nullable=True),
    sa.Column('message_id', sa.String(length=32), nullable=True),
    sa.Column('conversation_id', sa.String(length=32), nullable=True),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('claimed_until', sa.DateTime(), nullable=True),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_contact_seq', ['contact_id', 'seq'], unique=False)
        batch_op.create_index('ix_events_status_next', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_events_type_seq', ['type', 'seq'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_message_id'), ['message_id'], unique=False)
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('handoff_until', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('handoff_reason', sa.String(length=500), nullable=True))
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('metadata', sa.JSON(), nullable=True))
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('metadata', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('metadata')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('metadata')
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.drop_column('handoff_reason')
        batch_op.drop_column('handoff_until')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_message_id'))
        batch_op.drop_index('ix_events_type_seq')
        batch_op.drop_index('ix_events_status_next')
        batch_op.drop_index('ix_events_contact_seq')
    op.drop_table('events')
