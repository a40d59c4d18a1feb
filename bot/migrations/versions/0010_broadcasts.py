"""broadcasts: one message to many, user tags

Revision ID: 0010
Revises: 0009 (0007 on its own branch; chained after the merge of 'schedule')
Create Date: 2026-12-06 18:00:00

A broadcast (`broadcasts`) with its audience as listed (`broadcast_targets`) and as resolved
(`broadcast_recipients`: one per person, deduplicated); each message names its broadcast
(`messages.broadcast_id`). Users carry tags (`contact_tags`), a broadcast's audience by tag.
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'broadcasts',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('channel', sa.String(length=16), nullable=True),
        sa.Column('subject', sa.String(length=998), nullable=True),
        sa.Column('body', sa.Text(), nullable=True),
        sa.Column('template', sa.String(length=128), nullable=True),
        sa.Column('content_sid', sa.String(length=34), nullable=True),
        sa.Column('variables', sa.JSON(), nullable=True),
        sa.Column('tags', sa.JSON(), nullable=True),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('send_at', sa.DateTime(), nullable=True),
        sa.Column('quiet_hours', sa.String(length=11), nullable=True),
        sa.Column('idempotency_key', sa.String(length=255), nullable=True),
        sa.Column('request_hash', sa.String(length=64), nullable=True),
        sa.Column('targets', sa.Integer(), server_default='0', nullable=False),
        sa.Column('targets_done', sa.Integer(), server_default='0', nullable=False),
        sa.Column('tag_cursor', sa.Integer(), server_default='0', nullable=False),
        sa.Column('recipients', sa.Integer(), server_default='0', nullable=False),
        sa.Column('released', sa.Integer(), server_default='0', nullable=False),
        sa.Column('skipped', sa.JSON(), nullable=False),
        sa.Column('pump_token', sa.String(length=32), nullable=True),
        sa.Column('pumped_at', sa.DateTime(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.Column('ended_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('idempotency_key'),
    )
    op.create_table(
        'broadcast_targets',
        sa.Column('broadcast_id', sa.String(length=32), nullable=False),
        sa.Column('position', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('user_id', sa.String(length=128), nullable=True),
        sa.Column('phone', sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(['broadcast_id'], ['broadcasts.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('broadcast_id', 'position'),
    )
    op.create_table(
        'broadcast_recipients',
        sa.Column('broadcast_id', sa.String(length=32), nullable=False),
        sa.Column('position', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('contact_id', sa.Integer(), nullable=False),
        sa.Column('channel', sa.String(length=16), nullable=False),
        sa.Column('variables', sa.JSON(), nullable=True),
        sa.Column('content_sid', sa.String(length=34), nullable=True),
        sa.ForeignKeyConstraint(['broadcast_id'], ['broadcasts.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('broadcast_id', 'position'),
        sa.UniqueConstraint('broadcast_id', 'contact_id', name='uq_broadcast_recipients_contact'),
    )
    op.create_table(
        'contact_tags',
        sa.Column('tag', sa.String(length=64), nullable=False),
        sa.Column('contact_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tag', 'contact_id'),
    )
    with op.batch_alter_table('contact_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_contact_tags_contact_id'), ['contact_id'], unique=False)
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('broadcast_id', sa.String(length=32), nullable=True))
        batch_op.create_foreign_key('fk_messages_broadcast_id', 'broadcasts', ['broadcast_id'], ['id'])
        batch_op.create_index('ix_messages_broadcast_status', ['broadcast_id', 'status'], unique=False)


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_broadcast_status')
        batch_op.drop_constraint('fk_messages_broadcast_id', type_='foreignkey')
        batch_op.drop_column('broadcast_id')
    with op.batch_alter_table('contact_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_contact_tags_contact_id'))
    op.drop_table('contact_tags')
    op.drop_table('broadcast_recipients')
    op.drop_table('broadcast_targets')
    op.drop_table('broadcasts')
