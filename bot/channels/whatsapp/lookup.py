"""Looking Twilio up for a send whose answer was lost (invariant 2: "may have been accepted").

Twilio can be asked: `messages.list(to=, from_=)` returns the recipient's recent messages from
our sender, and `match_accepted_send` picks ours among them, if any (docs/ARCHITECTURE.md, "The
life of a message"). The list is fetched on the worker's pool; the match reads the database, in
the task's thread.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from bot.channels.outcomes import Accepted
from bot.channels.whatsapp.sending import accepted_status
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import Direction, MessageStatus

#: Recent messages asked for when looking up a send whose fate is unknown.
LOOKUP_LIMIT = 50


def recent_sends(client: Any, params: dict) -> list[Any]:
    """Twilio's most recent messages from our sender to this recipient (no database, no app
    context: safe on the pool's threads)."""
    return list(client.messages.list(to=params["to"], from_=params["from_"], limit=LOOKUP_LIMIT))


def match_accepted_send(message: Message | sa.Row, params: dict, recent: list[Any], since: datetime,
                        exclude: set[str] = frozenset()) -> Accepted | None:
    """Which of Twilio's `recent` messages is this send, if any.

    Candidates: messages from our sender to this recipient created since the attempt began (with
    a minute of slack for clock skew), whose SID no row of ours holds, with the same body when
    the send had one. A template's text is Twilio's to render, so for a template (or media
    alone) the lookup only answers when no other message to this contact is in flight (it could
    be that one's); then the send is retried: a possible duplicate rather than a lost message.
    """
    sent_body = params.get("body")
    if not sent_body:
        in_flight_beside = db.session.scalar(
            sa.select(sa.func.count()).select_from(Message).where(
                Message.contact_id == message.contact_id, Message.direction == Direction.OUTBOUND,
                Message.id != message.id, Message.status == MessageStatus.DISPATCHING))
        if in_flight_beside:
            return None
    earliest = since - timedelta(minutes=1)
    candidates = []
    for candidate in recent:
        created = candidate.date_created
        if created is None or created.astimezone(timezone.utc).replace(tzinfo=None) < earliest:
            continue
        if sent_body and (candidate.body or "") != sent_body:
            continue
        if candidate.sid not in exclude:
            candidates.append(candidate)
    if not candidates:
        return None
    held = set(db.session.scalars(sa.select(Message.twilio_sid).where(
        Message.twilio_sid.in_([c.sid for c in candidates]))))
    db.session.commit()
    for candidate in reversed(candidates):  # Twilio lists newest first: take the earliest of ours
        if candidate.sid not in held:
            return Accepted(candidate.sid, accepted_status(candidate.status).value)
    return None
