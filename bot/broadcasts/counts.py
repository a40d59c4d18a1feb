"""A broadcast's counts, read from its messages (GET /broadcasts/<id>, broadcast.completed).

Counted from the messages' own statuses, which only move up (invariant 3), so the counts are
as true as the callbacks received so far: `sent` is every message a provider took and that has
not failed since, `delivered` includes those read, `failed` is by error code. A fallback carries
its broadcast's id and counts on its own channel (docs/api.md, "Broadcasts").
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import sqlalchemy as sa

from bot.clock import isoformat
from bot.delivery.claims import UNSENT
from bot.extensions import db
from bot.models import Broadcast, BroadcastRecipient, Message
from bot.vocabulary import BroadcastState, MessageStatus

FAILED = frozenset({MessageStatus.FAILED, MessageStatus.UNDELIVERED})
DELIVERED = frozenset({MessageStatus.DELIVERED, MessageStatus.READ})
LEFT = frozenset({MessageStatus.ACCEPTED, MessageStatus.SCHEDULED, MessageStatus.QUEUED, MessageStatus.SENDING,
                  MessageStatus.SENT}) | DELIVERED


def counts(broadcast: Broadcast) -> dict[str, Any]:
    """{"recipients", "skipped", "queued", "sent", "delivered", "read", "failed", "canceled", "by_channel"}."""
    by_channel: dict[str, Counter[str]] = defaultdict(Counter)
    failed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    rows = db.session.execute(
        sa.select(Message.channel, Message.status, Message.error_code, sa.func.count())
        .where(Message.broadcast_id == broadcast.id)
        .group_by(Message.channel, Message.status, Message.error_code)).all()
    for channel, status, error_code, n in rows:
        mine = by_channel[channel]
        if status in UNSENT:
            keys = ("queued",)
        elif status in FAILED:
            keys = ("failed",)
            failed[str(error_code) if error_code is not None else "unknown"] += n
        elif status == MessageStatus.CANCELED:
            keys = ("canceled",)
        else:
            keys = ("sent",) + (("delivered",) if status in DELIVERED else ()) + \
                (("read",) if status == MessageStatus.READ else ())
        for key in keys:
            mine[key] += n
            total[key] += n
    if broadcast.state in (BroadcastState.SCHEDULED, BroadcastState.EXPANDING, BroadcastState.SENDING):
        # Recipients not released yet wait too (the pump releases a window at a time).
        for channel, n in db.session.execute(
                sa.select(BroadcastRecipient.channel, sa.func.count())
                .where(BroadcastRecipient.broadcast_id == broadcast.id,
                       BroadcastRecipient.position > broadcast.released)
                .group_by(BroadcastRecipient.channel)).all():
            by_channel[channel]["queued"] += n
            total["queued"] += n
    return {
        "recipients": broadcast.recipients,
        "skipped": dict(broadcast.skipped or {}),
        "queued": total["queued"],
        "sent": total["sent"],
        "delivered": total["delivered"],
        "read": total["read"],
        "failed": dict(failed),
        "canceled": total["canceled"],
        "by_channel": {channel: {key: mine[key] for key in ("queued", "sent", "delivered", "read", "failed",
                                                            "canceled")}
                       for channel, mine in sorted(by_channel.items())},
    }


def broadcast_dict(broadcast: Broadcast) -> dict[str, Any]:
    """The JSON shape of GET /broadcasts/<id>: what it says, its state and its counts."""
    return {
        "id": broadcast.id,
        "state": broadcast.state,
        **counts(broadcast),
        "targets": broadcast.targets,
        "tags": broadcast.tags or [],
        "template": broadcast.template,
        "body": broadcast.body,
        "channel": broadcast.channel,
        "metadata": broadcast.backend_metadata,
        "send_at": isoformat(broadcast.send_at),
        "created_at": isoformat(broadcast.created_at),
        "ended_at": isoformat(broadcast.ended_at),
    }
