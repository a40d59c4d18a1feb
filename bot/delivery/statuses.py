"""Message status: the rank order, and recording status callbacks without regressions.

Twilio's callbacks arrive out of order, repeated, and sometimes before the send that caused them
has stored the message SID. So every callback is first kept as an event (unique per SID and
status), then applied with a conditional UPDATE that only ever raises the rank; applying the same
event twice, or in any order, ends in the same row.
"""
from __future__ import annotations

import functools
import logging
from datetime import datetime, timedelta
from typing import Mapping

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from bot.channels.base import StatusCallback
from bot.clock import utcnow
from bot.extensions import db
from bot.delivery import events, fallback
from bot.models import Contact, Message, StatusEvent
from bot.vocabulary import REPORTED_STATUSES, Channel, Direction, MessageStatus, parse_outbound_status

log = logging.getLogger(__name__)


@functools.cache
def _statements() -> dict[str, sa.Executable]:
    # Built once, run with bound parameters: composing a statement costs more CPU than running it
    # (bench/THROUGHPUT.md, "Profile"), and these run for every status callback.
    message_id, now = sa.bindparam("message_id"), sa.bindparam("now")
    return {
        "raise": sa.update(Message)
        .where(Message.id == message_id, Message.status_rank < sa.bindparam("rank"))
        .values(status=sa.bindparam("status"), status_rank=sa.bindparam("rank"), updated_at=now, claimed_until=None)
        .execution_options(synchronize_session=False),
        "error": sa.update(Message)
        .where(Message.id == message_id, Message.error_code.is_(None), Message.error_message.is_(None))
        .values(error_code=sa.bindparam("error_code"), error_message=sa.bindparam("error_message"), updated_at=now)
        .execution_options(synchronize_session=False),
        "outbound_by_sid": sa.select(Message.id).where(
            Message.twilio_sid == sa.bindparam("sid"), Message.direction == Direction.OUTBOUND),
        "events_by_sid": sa.select(StatusEvent).where(StatusEvent.twilio_sid == sa.bindparam("sid"))
        .order_by(StatusEvent.id),
        # The event, linked to its outbound message if that is known (a status callback naming an
        # inbound message's SID must never move it out of "received").
        "insert_event": sa.insert(StatusEvent.__table__).values(
            twilio_sid=sa.bindparam("sid"), status=sa.bindparam("status"),
            error_code=sa.bindparam("error_code"), error_message=sa.bindparam("error_message"),
            payload=sa.bindparam("payload", type_=StatusEvent.__table__.c.payload.type),
            received_at=sa.bindparam("received_at"),
            message_id=sa.select(Message.id).where(
                Message.twilio_sid == sa.bindparam("sid"), Message.direction == Direction.OUTBOUND)
            .scalar_subquery(),
        ).returning(StatusEvent.__table__.c.message_id),
    }


def raise_status(message_id: str, status: MessageStatus, error_code: int | None = None,
                 error_message: str | None = None) -> bool:
    """Move a message to `status` if that ranks above its current one; keep any error code.

    Returns whether the status moved. Does not commit: the caller owns the transaction.
    """
    status = MessageStatus(status)
    now = utcnow()
    statements = _statements()
    moved = db.session.execute(statements["raise"], {
        "message_id": message_id, "rank": status.rank, "status": status.value, "now": now}).rowcount
    if error_code is not None or error_message:
        # An error is kept even when the status cannot move (e.g. 'failed' after 'read'), and the
        # first one wins: it is the one that explains what went wrong.
        db.session.execute(statements["error"], {
            "message_id": message_id, "error_code": error_code, "error_message": error_message, "now": now})
    if moved and status in REPORTED_STATUSES:
        report_statuses({message_id: status})
    return bool(moved)


def report_statuses(moves: Mapping[str, MessageStatus]) -> None:
    """message.status for each message that just moved to the status given, in the move's
    transaction (invariant 12), with one read for all: one event per transition, never one per
    repeated callback (only a move that raised the rank reports)."""
    rows = db.session.execute(
        sa.select(Message, Contact.phone, Contact.email, Contact.user_id).join(Contact, Contact.id == Message.contact_id)
        .where(Message.id.in_(list(moves))).execution_options(populate_existing=True)).all()
    for message, phone, email, user_id in rows:
        status = moves[message.id]
        if status in REPORTED_STATUSES:
            to = email if message.channel == Channel.EMAIL else phone
            events.message_status(message, to, status.value, message.error_code, message.error_message, user_id)
    # A final failure may hand the notification to the user's next channel, in this same
    # transaction (invariant 13).
    fallback.after_failures([message for message, *_ in rows if moves[message.id] in fallback.FINAL_FAILURES])


def record_callback(callback: StatusCallback) -> bool:
    """Store a status callback (parsed by its channel: bot.channels.whatsapp.callbacks) as an
    event and apply it. Returns False for a repeat.

    Two statements when the message is known (most callbacks): the event's INSERT links it to
    its message in the same statement, and only this event is applied. When the SID is not
    recorded yet, the sender applies the event once it is (`apply_pending_events`).
    """
    sid, status = callback.provider_id, callback.status
    error_code, error_message = callback.error_code, callback.error_message
    try:
        # Committed before anything is applied: with the sender committing its SID before looking
        # for early events (apply_pending_events), one of the two always sees the other.
        message_id = db.session.execute(_statements()["insert_event"], {
            "sid": sid, "status": status, "error_code": error_code, "error_message": error_message,
            "payload": callback.payload, "received_at": utcnow()}).scalar()
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        log.info("repeated status callback %s %s ignored", sid, status)
        return False
    if message_id is None:  # the send has not recorded this SID yet (or it is not ours)
        apply_pending_events(sid)
        return True
    parsed = callback.mapped
    if parsed is None:
        log.warning("status callback with unknown status %r for %s kept, not applied", status, sid)
        return True
    raise_status(message_id, parsed, error_code, error_message)
    db.session.commit()
    return True


def apply_pending_events(sid: str, message_id: str | None = None) -> int:
    """Link the events of `sid` to their message (if it is known yet) and apply them; commits.

    Returns how many events were applied. Called after a callback is stored and after a send
    records its SID (which passes its outbound message's id: one lookup less), and by the
    periodic sweep as a safety net.
    """
    if message_id is None:
        # Outbound only: a status callback naming an inbound message's SID must not move that
        # message out of "received" (the engine would never process it).
        message_id = db.session.scalar(_statements()["outbound_by_sid"], {"sid": sid})
    if message_id is None:
        return 0
    events = db.session.scalars(_statements()["events_by_sid"], {"sid": sid}).all()
    for event in events:
        status = parse_outbound_status(event.status)
        if status is None:
            log.warning("status callback with unknown status %r for %s kept, not applied", event.status, sid)
            continue
        event.message_id = message_id
        raise_status(message_id, status, event.error_code, event.error_message)
    db.session.commit()
    return len(events)


def apply_orphan_events(now: datetime | None = None, limit: int = 1000) -> int:
    """Apply callbacks a race left unlinked (the safety net behind `apply_pending_events`);
    returns how many events were applied. A day bounds the search: callbacks for messages some
    other system sent never match."""
    now = now or utcnow()
    sids = db.session.scalars(
        sa.select(StatusEvent.twilio_sid)
        .where(StatusEvent.message_id.is_(None), StatusEvent.received_at >= now - timedelta(days=1))
        .distinct().limit(limit)).all()
    db.session.commit()
    applied = sum(apply_pending_events(sid) for sid in sids)
    if applied:
        log.info("applied %d status events a race had left unlinked", applied)
    return applied
