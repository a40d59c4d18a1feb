"""users by the backend's id, email beside WhatsApp, fallbacks

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 15:00:00

A contact becomes a user of the backend (`user_id`, email, name, locale, timezone, channel
order, email consent); a phone is optional for a user known only by email. Messages name their
channel, keep an email's subject and provider id, and link a fallback to the message it replaces
(unique: invariant 13). The consent ledger names the channel (invariant 14). SendGrid's events
are kept once each (`email_events`).
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    sqlite = op.get_bind().dialect.name == 'sqlite'
    if sqlite:
        # SQLite alters a column's nullability by copying the table; with foreign keys enforced,
        # dropping the old `contacts` (which messages reference) would fail. No DML has run yet
        # on this connection, so the pragma takes effect (it is ignored inside a transaction).
        op.execute('PRAGMA foreign_keys=OFF')
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.alter_column('phone', existing_type=sa.String(length=16), nullable=True)
        batch_op.add_column(sa.Column('user_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('email', sa.String(length=254), nullable=True))
        batch_op.add_column(sa.Column('name', sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column('locale', sa.String(length=35), nullable=True))
        batch_op.add_column(sa.Column('timezone', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('channels', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('email_consent', sa.String(length=16), server_default='unknown',
                                      nullable=False))
        batch_op.create_unique_constraint('uq_contacts_user_id', ['user_id'])
        batch_op.create_unique_constraint('uq_contacts_email', ['email'])
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('channel', sa.String(length=16), server_default='whatsapp', nullable=False))
        batch_op.add_column(sa.Column('subject', sa.String(length=998), nullable=True))
        batch_op.add_column(sa.Column('provider_message_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('fallback_of', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_messages_provider_message_id'), ['provider_message_id'], unique=False)
        batch_op.create_unique_constraint('uq_messages_fallback_of', ['fallback_of'])
        batch_op.create_foreign_key('fk_messages_fallback_of', 'messages', ['fallback_of'], ['id'])
    with op.batch_alter_table('consent_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('channel', sa.String(length=16), server_default='whatsapp', nullable=False))
    op.create_table('email_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sg_event_id', sa.String(length=100), nullable=False),
    sa.Column('message_id', sa.String(length=32), nullable=True),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('occurred_at', sa.DateTime(), nullable=True),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sg_event_id')
    )
    with op.batch_alter_table('email_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_email_events_message_id'), ['message_id'], unique=False)
    if sqlite:
        op.execute('PRAGMA foreign_keys=ON')


def downgrade():
    with op.batch_alter_table('email_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_email_events_message_id'))
    op.drop_table('email_events')
    with op.batch_alter_table('consent_events', schema=None) as batch_op:
        batch_op.drop_column('channel')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_constraint('fk_messages_fallback_of', type_='foreignkey')
        batch_op.drop_constraint('uq_messages_fallback_of', type_='unique')
        batch_op.drop_index(batch_op.f('ix_messages_provider_message_id'))
        batch_op.drop_column('fallback_of')
        batch_op.drop_column('provider_message_id')
        batch_op.drop_column('subject')
        batch_op.drop_column('channel')
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.drop_constraint('uq_contacts_email', type_='unique')
        batch_op.drop_constraint('uq_contacts_user_id', type_='unique')
        batch_op.drop_column('email_consent')
        batch_op.drop_column('channels')
        batch_op.drop_column('timezone')
        batch_op.drop_column('locale')
        batch_op.drop_column('name')
        batch_op.drop_column('email')
        batch_op.drop_column('user_id')
        batch_op.alter_column('phone', existing_type=sa.String(length=16), nullable=False)
