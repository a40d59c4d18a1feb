"""quiet hours kept on the message: the sender checks them again when it sends

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 21:00:00

`messages.quiet_hours`: the quiet hours (`HH:MM-HH:MM`) that applied when the message was made
(the request's `quiet_hours`, else QUIET_HOURS; a broadcast's own; a fallback its original's),
read in the recipient's timezone at send time, so a message that comes due inside them later (a
backlog, a retry, a fallback) is held until they end (invariant 15). Null: none (replies, agents'
messages, a request's `"quiet_hours": null`). Nullable, no default: adding it rewrites nothing.
"""
from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quiet_hours', sa.String(length=11), nullable=True))


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('quiet_hours')
