"""Held messages leave when their time comes, and can be canceled until then (invariant 15).

A message held for later (`messages.not_before`: its send_at, or the end of the recipient's quiet
hours, decided by bot/delivery/holding.py) waits in the database, not in the queue's memory. Its
send task is also scheduled on the queue for that instant, but only as a hint: `release_due`, run
every few seconds by each consumer (bot/delivery/ticker.py) and every minute by the outbox sweep,
finds due held rows through the `not_before` index and enqueues them, so a Redis flush, a
restart or a killed worker delays a held message by seconds and loses nothing
(docs/ARCHITECTURE.md, "Held messages"). The sender also holds a claimed message here
(`hold_at_send`) when its quiet hours cover the moment it was about to leave.
"""
from __future__ import annotations

import functools
import logging
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import events, outbox
from bot.delivery.claims import release_next
from bot.extensions import db
from bot.models import Contact, Conversation, Message, hold_reason
from bot.vocabulary import Channel, ConversationStatus, Direction, MessageStatus

log = logging.getLogger(__name__)

#: Held rows released per statement; a larger backlog is released by the next run seconds later.
RELEASE_BATCH = 1000


@functools.cache
def _release_statement() -> sa.Update:
    # Built once (bench/THROUGHPUT.md, "Profile"). On PostgreSQL consumers releasing at the same
    # moment skip each other's rows (SKIP LOCKED). A released row is no longer held, and is due
    # for the outbox sweep REENQUEUE_AFTER from now should its task be lost.
    now = sa.bindparam("now")
    due = (sa.select(Message.id)
           .where(Message.not_before <= now, Message.status == MessageStatus.PENDING,
                  Message.direction == Direction.OUTBOUND)
           .order_by(Message.not_before).limit(RELEASE_BATCH)
           .with_for_update(skip_locked=True))
    return (sa.update(Message)
            .where(Message.id.in_(due), Message.status == MessageStatus.PENDING)
            .values(not_before=None, next_attempt_at=sa.bindparam("hold_off_until"), updated_at=now)
            .returning(Message.id, Message.kind, Message.channel)
            .execution_options(synchronize_session=False))


@functools.cache
def _release_conversations_statement() -> sa.Update:
    # A backend-started flow held for later (its send_at, the user's quiet hours) is released as
    # a held message is: no longer held, due for the sweep REENQUEUE_AFTER from now.
    now = sa.bindparam("now")
    due = (sa.select(Conversation.id)
           .where(Conversation.not_before <= now, Conversation.status == ConversationStatus.STARTING)
           .order_by(Conversation.not_before).limit(RELEASE_BATCH)
           .with_for_update(skip_locked=True))
    return (sa.update(Conversation)
            .where(Conversation.id.in_(due), Conversation.status == ConversationStatus.STARTING)
            .values(not_before=None, next_attempt_at=sa.bindparam("hold_off_until"), updated_at=now)
            .returning(Conversation.id)
            .execution_options(synchronize_session=False))


def release_due(now: datetime | None = None) -> int:
    """Enqueue every held message, and start every held flow, whose time has come (up to
    RELEASE_BATCH each); returns how many.

    One indexed statement each when nothing is due, which is what it costs every few seconds."""
    now = now or utcnow()
    params = {"now": now, "hold_off_until": now + outbox.REENQUEUE_AFTER}
    rows = db.session.execute(_release_statement(), params).all()
    for row in rows:
        outbox.defer(outbox.Work.SEND, row.id, outbox.send_priority(row.kind, row.channel))
    flows = db.session.scalars(_release_conversations_statement(), params).all()
    for conversation_id in flows:
        outbox.defer_conversation_start(conversation_id)
    db.session.commit()  # the sends and starts are enqueued by this commit (outbox)
    if rows or flows:
        log.info("released %d held messages and %d held flows", len(rows), len(flows))
    return len(rows) + len(flows)


class SendTimeHold(NamedTuple):
    """A claimed message the sender holds: its row (as claimed), until when, and its recipient's
    address and user id (for `message.held`)."""

    row: Any
    until: datetime
    to: str | None
    user_id: str | None


def hold_at_send(held: list[SendTimeHold]) -> None:
    """Claimed messages that would arrive inside their recipient's quiet hours: back to
    `pending`, held until then (`not_before`), the claim released and the attempt not counted,
    with `message.held` (reason quiet_hours) in the same commit; `release_due` lets each go when
    it is due (docs/ARCHITECTURE.md, invariant 15, "Quiet hours at send time"). Commits.

    Nothing of this attempt reached a provider, so nothing can be sent twice. `pending` ranks
    below `dispatching`: the one move back, made only under this claim (the UPDATE requires it).
    An earlier attempt's `unsure_since` stays, so the next claim looks the provider up first, and
    `cancel` refuses it (it may have left)."""
    now = utcnow()
    kept = []
    for item in held:
        row = item.row
        moved = db.session.execute(
            sa.update(Message).where(Message.id == row.id, Message.status == MessageStatus.DISPATCHING)
            .values(status=MessageStatus.PENDING, status_rank=MessageStatus.PENDING.rank, claimed_until=None,
                    next_attempt_at=None, not_before=item.until, attempts=Message.attempts - 1, updated_at=now)
            .execution_options(synchronize_session=False)).rowcount
        if moved:
            kept.append(item)
            events.message_held(row.id, contact_id=row.contact_id, channel=row.channel, kind=row.kind, to=item.to,
                                user_id=item.user_id, held_until=item.until,
                                reason=hold_reason(row.send_at, item.until), send_at=row.send_at,
                                metadata=row._mapping["metadata"], locale=row.locale)
    db.session.commit()
    for item in kept:
        log.info("message %s held for its recipient's quiet hours until %s", item.row.id, item.until.isoformat())
        # Held, it holds none of its contact's later messages back (claims._earlier_unsent_message).
        release_next(item.row.id, item.row.contact_id)


class Cancel(StrEnum):
    """What `cancel` found."""

    CANCELED = "canceled"  # canceled now, or it already was: it will never leave
    NOT_FOUND = "not_found"
    TOO_LATE = "too_late"  # claimed, sent or failed: it left (or is leaving), or it ended


#: Statuses a cancel can stop: nothing of the message reached a provider yet. A row whose fate
#: is unknown (`unsure_since`: retrying, or pending again, held at send time after such an
#: attempt) may have been accepted, so it cannot be called back.
CANCELABLE = (MessageStatus.PENDING, MessageStatus.RETRYING)


def cancel(message_id: str) -> tuple[Cancel, Message | None]:
    """Cancel an outbound message that has not left: it becomes `canceled` (final), reported
    to the backend (message.canceled) in the same commit, and its contact's next message gets
    its turn. One conditional UPDATE, so it races a claim safely: whichever commits first wins.
    """
    now = utcnow()
    canceled = db.session.execute(
        sa.update(Message)
        .where(Message.id == message_id, Message.direction == Direction.OUTBOUND,
               Message.status.in_(CANCELABLE), Message.unsure_since.is_(None))
        .values(status=MessageStatus.CANCELED, status_rank=MessageStatus.CANCELED.rank, not_before=None,
                next_attempt_at=None, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount
    found = db.session.execute(
        sa.select(Message, Contact).join(Contact, Contact.id == Message.contact_id)
        .where(Message.id == message_id, Message.direction == Direction.OUTBOUND)
        .execution_options(populate_existing=True)).first()
    if found is None:
        db.session.rollback()
        return Cancel.NOT_FOUND, None
    message, contact = found
    if canceled:
        to = contact.email if message.channel == Channel.EMAIL else contact.phone
        events.message_canceled(message, to, contact.user_id)
    db.session.commit()
    if canceled:
        release_next(message_id, message.contact_id)
        return Cancel.CANCELED, message
    return (Cancel.CANCELED if message.status == MessageStatus.CANCELED else Cancel.TOO_LATE), message
