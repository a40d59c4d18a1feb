"""one Idempotency-Key space for messages and flows

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 22:00:00

`idempotency_keys`: each key of POST /notify once, with what its first request created (a message
or a conversation) and the request's hash. Before, each table had its own unique index, so one key
used concurrently for a message and for a flow created both. Keys already stored on messages and
conversations are copied in (a key found on both, which the old indexes allowed, keeps the message).
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('idempotency_keys',
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('target_id', sa.String(length=32), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.execute(
        "INSERT INTO idempotency_keys (key, kind, target_id, request_hash, created_at) "
        "SELECT idempotency_key, 'message', id, COALESCE(request_hash, ''), created_at FROM messages "
        "WHERE idempotency_key IS NOT NULL"
    )
    op.execute(
        "INSERT INTO idempotency_keys (key, kind, target_id, request_hash, created_at) "
        "SELECT idempotency_key, 'conversation', id, COALESCE(request_hash, ''), started_at FROM conversations "
        "WHERE idempotency_key IS NOT NULL "
        "AND idempotency_key NOT IN (SELECT key FROM idempotency_keys)"
    )


def downgrade():
    op.drop_table('idempotency_keys')
