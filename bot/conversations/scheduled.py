"""Backend-started flows held like notifications (invariant 15; docs/ARCHITECTURE.md, "Scheduled
flows"): a flow asked for with `send_at` or started inside the user's quiet hours waits in the
database as a `starting` conversation with `not_before`, is started by the release
(bot/delivery/release.py) when its time comes, and can be canceled until then. Its first
messages carry its quiet hours, so the sender holds them too should they come due inside them;
its answers to the user's own messages are replies and never held.
"""
from __future__ import annotations

from enum import StrEnum

from bot.clock import utcnow
from bot.contacts import lock_contact
from bot.conversations.store import end_conversation
from bot.extensions import db
from bot.models import Conversation, Message
from bot.vocabulary import ConversationStatus

#: The error a canceled flow ends with (conversation.cancelled says it).
CANCELED_BY_BACKEND = "canceled by the backend before it started"


def is_held(conversation: Conversation) -> bool:
    """Whether the conversation still waits for its time: a task that comes early (the queue's
    hint, a stale enqueue) leaves it to the release."""
    return conversation.not_before is not None and conversation.not_before > utcnow()


def hold_first_messages(conversation: Conversation, first: list[Message]) -> None:
    """The flow's opening messages get its quiet hours (the sender checks them in the user's
    timezone when it sends), as a notification's do; a flow without them (quiet hours off for
    the request) sends as before."""
    if conversation.quiet_hours is None:
        return
    for row in first:
        row.quiet_hours = conversation.quiet_hours


class CancelStart(StrEnum):
    """What `cancel_start` found."""

    CANCELED = "canceled"  # canceled now, or it already was
    NOT_FOUND = "not_found"
    TOO_LATE = "too_late"  # it started (or ended) already


def cancel_start(conversation_id: str) -> tuple[CancelStart, Conversation | None]:
    """Cancel a backend-started flow that has not started: it ends `cancelled`, reported
    (conversation.cancelled) in the same commit. Under the contact's lock, the one the start
    takes, so a start under way either finished first (too late) or finds it cancelled."""
    conversation = db.session.get(Conversation, conversation_id)
    if conversation is None:
        db.session.rollback()
        return CancelStart.NOT_FOUND, None
    lock_contact(conversation.contact_id)
    db.session.refresh(conversation)
    if conversation.status == ConversationStatus.STARTING:
        conversation.not_before = None
        end_conversation(conversation, ConversationStatus.CANCELLED, error=CANCELED_BY_BACKEND)
        db.session.commit()
        return CancelStart.CANCELED, conversation
    db.session.commit()
    if conversation.status == ConversationStatus.CANCELLED and conversation.error == CANCELED_BY_BACKEND:
        return CancelStart.CANCELED, conversation
    return CancelStart.TOO_LATE, conversation
