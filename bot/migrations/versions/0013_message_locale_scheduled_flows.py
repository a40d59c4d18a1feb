"""the message's locale as data; backend-started flows held like notifications

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 00:00:00

`messages.locale`: the locale the message's copy was resolved to when it was made (the template's
ContentSid, its email copy, a flow reply's copy: bot/locales.py), so an email is rendered in it at
send time and a backend reads it in `GET /messages/<id>` and the message's events. Null: text the
backend wrote itself (nothing was resolved), a ContentSid it named, and rows made before this.
`broadcast_recipients.locale`: the same, resolved while the broadcast expands, for its message.

`conversations.send_at`, `not_before`, `quiet_hours`: a backend-started flow (POST /notify with
`flow`) held in the database until its `send_at`, pushed past the quiet hours in the user's
timezone, as a held message is (invariant 15); `quiet_hours` is kept for its first messages,
which the sender checks again. All nullable, no default: adding them rewrites nothing.
"""
from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('locale', sa.String(length=35), nullable=True))
    with op.batch_alter_table('broadcast_recipients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('locale', sa.String(length=35), nullable=True))
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('send_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('not_before', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('quiet_hours', sa.String(length=11), nullable=True))
        batch_op.create_index('ix_conversations_not_before', ['not_before'], unique=False)


def downgrade():
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index('ix_conversations_not_before')
        batch_op.drop_column('quiet_hours')
        batch_op.drop_column('not_before')
        batch_op.drop_column('send_at')
    with op.batch_alter_table('broadcast_recipients', schema=None) as batch_op:
        batch_op.drop_column('locale')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('locale')
