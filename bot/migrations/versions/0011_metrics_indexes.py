"""metrics: partial indexes that keep a /metrics scrape cheap with a million messages

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 18:00:00

Each index serves one statement of `bot/metrics/readings.py` and holds only the few rows that
statement reads (docs/metrics.md, "What a scrape costs"; bench/METRICS.md): messages not final
yet, messages failed for good (by when they failed), messages still to leave (by channel, kind and age), contacts with
a handoff, open conversations by flow. On PostgreSQL, extended statistics on (channel,
direction, status) let the scrape estimate the final statuses' counts of a big table from
ANALYZE's sample instead of counting every row.
"""
from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

LIVE = sa.text("status IN ('pending', 'dispatching', 'retrying', 'accepted', 'scheduled', 'queued', 'sending', "
               "'received')")
FAILED = sa.text("direction = 'outbound' AND status IN ('failed', 'undelivered')")
UNSENT = sa.text("direction = 'outbound' AND status IN ('pending', 'dispatching', 'retrying')")
IN_HANDOFF = sa.text("handoff_until IS NOT NULL")
OPEN = sa.text("status IN ('starting', 'active')")


def upgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_live', ['channel', 'direction', 'status'], unique=False,
                              postgresql_where=LIVE, sqlite_where=LIVE)
        batch_op.create_index('ix_messages_failed_recent', ['updated_at', 'channel', 'error_code'], unique=False,
                              postgresql_where=FAILED, sqlite_where=FAILED)
        batch_op.create_index('ix_messages_unsent_lane', ['channel', 'kind', 'created_at'], unique=False,
                              postgresql_where=UNSENT, sqlite_where=UNSENT)
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.create_index('ix_contacts_handoff', ['handoff_until'], unique=False,
                              postgresql_where=IN_HANDOFF, sqlite_where=IN_HANDOFF)
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index('ix_conversations_open_flow', ['flow'], unique=False,
                              postgresql_where=OPEN, sqlite_where=OPEN)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('CREATE STATISTICS IF NOT EXISTS st_messages_channel_direction_status (mcv) '
                   'ON channel, direction, status FROM messages')
        op.execute('ANALYZE messages')


def downgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP STATISTICS IF EXISTS st_messages_channel_direction_status')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index('ix_conversations_open_flow')
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.drop_index('ix_contacts_handoff')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_unsent_lane')
        batch_op.drop_index('ix_messages_failed_recent')
        batch_op.drop_index('ix_messages_live')
