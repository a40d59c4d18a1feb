"""events: an order safe for the cursor (the writing transaction's id), and claim tokens

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 15:00:00

`events.txid` is the id of the transaction that wrote the event (PostgreSQL's
`pg_current_xact_id()`, 0 on SQLite), and events are ordered by (txid, seq) and served only once
every transaction below them has ended (docs/ARCHITECTURE.md, invariant 12). Events written
before this revision get 0: they are all committed, so they come first, in `seq` order.
`events.claim_token` lets a delivery attempt settle only the claim it made.
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

UNFINISHED = sa.text("status IN ('pending', 'delivering')")


def upgrade():
    with op.batch_alter_table('events', schema=None) as batch_op:
        # A constant default fills the rows already there without rewriting them one by one;
        # it is dropped right after: every insert sets txid (bot.models.current_txid).
        batch_op.add_column(sa.Column('txid', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('claim_token', sa.String(length=32), nullable=True))
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.alter_column('txid', server_default=None)
        batch_op.drop_index('ix_events_contact_seq')
        batch_op.drop_index('ix_events_type_seq')
        batch_op.create_index('ix_events_order', ['txid', 'seq'], unique=False)
        batch_op.create_index('ix_events_contact_order', ['contact_id', 'txid', 'seq'], unique=False)
        batch_op.create_index('ix_events_type_order', ['type', 'txid', 'seq'], unique=False)
        batch_op.create_index('ix_events_unfinished_order', ['txid', 'seq'], unique=False,
                              postgresql_where=UNFINISHED, sqlite_where=UNFINISHED)


def downgrade():
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_unfinished_order')
        batch_op.drop_index('ix_events_type_order')
        batch_op.drop_index('ix_events_contact_order')
        batch_op.drop_index('ix_events_order')
        batch_op.create_index('ix_events_type_seq', ['type', 'seq'], unique=False)
        batch_op.create_index('ix_events_contact_seq', ['contact_id', 'seq'], unique=False)
        batch_op.drop_column('claim_token')
        batch_op.drop_column('txid')
