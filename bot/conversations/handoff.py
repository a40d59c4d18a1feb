"""Human handoff: a person answers a contact instead of the bot, for a while.

Started by the backend (POST /contacts/<phone>/handoff), by the user (HANDOFF_KEYWORDS: "agent",
"human"), or by a flow step that says so (`Step.handoff`); ended by the backend (DELETE), or by
itself after HANDOFF_HOURS. While it lasts the contact's open conversation is cancelled, the bot
sends them nothing automated, and every message they write is stored and pushed to the backend as
`message.received` with `"handoff": true` (the engine's `human_handoff` stage). STOP, START and
HELP work as always: consent keywords go before it. Nothing here commits; the caller holds the
contact's lock (invariant 6).
"""
from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from flask import current_app

from bot.clock import utcnow
from bot.conversations.store import end_open_conversations
from bot.delivery import events
from bot.extensions import db
from bot.models import Contact
from bot.vocabulary import ConversationStatus


#: Why a conversation ended because a person took the contact over: the handoff's start and a
#: backend-started flow that reaches the worker during a handoff end theirs with the same words.
HANDED_OVER = "handed over to a person"


class HandoffBy:
    """Who started or ended a handoff (the events' `by`)."""

    API = "api"
    #: An operator on the dashboard's handoff inbox (docs/dashboard.md).
    OPERATOR = "operator"
    USER = "user"
    FLOW = "flow"
    EXPIRY = "expiry"


def in_handoff(contact: Contact, now: datetime | None = None) -> bool:
    """Whether a person, not the bot, answers this contact now."""
    return contact.handoff_until is not None and contact.handoff_until > (now or utcnow())


def start_handoff(contact: Contact, *, reason: str | None, by: str, hours: float | None = None) -> None:
    """Pause the bot for the contact: cancel its open conversation, note until when; the backend
    hears contact.handoff_started. A handoff already running is extended (no second event)."""
    now = utcnow()
    running = in_handoff(contact, now)
    contact.handoff_until = now + timedelta(hours=hours or float(current_app.config["HANDOFF_HOURS"]))
    contact.handoff_reason = reason[:500] if reason else None
    if running:
        return
    end_open_conversations(contact.id, ConversationStatus.CANCELLED, error=HANDED_OVER)
    events.handoff_changed(contact, True, reason=contact.handoff_reason, by=by)


def end_handoff(contact: Contact, *, by: str) -> bool:
    """Give the contact back to the bot; False if no handoff was running."""
    if contact.handoff_until is None:
        return False
    reason = contact.handoff_reason
    contact.handoff_until = None
    contact.handoff_reason = None
    events.handoff_changed(contact, False, reason=reason, by=by)
    return True


def expired_handoffs(now: datetime | None = None, limit: int = 500) -> list[int]:
    """Contacts whose handoff has run out (ended by `end_handoff(..., by=EXPIRY)`)."""
    return list(db.session.scalars(
        sa.select(Contact.id).where(Contact.handoff_until.is_not(None), Contact.handoff_until <= (now or utcnow()))
        .limit(limit)))
