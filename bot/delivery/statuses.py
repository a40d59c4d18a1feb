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
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from bot.channels.base import StatusCallback
from bot.clock import utcnow
from bot.extensions import db
from bot.delivery import events, fallback, outbox
from bot.models import Contact, Event, Message, StatusEvent, current_txid, new_id
from bot.vocabulary import (REPORTED_STATUSES, Channel, Direction, EventStatus, EventType, MessageStatus,
                            parse_outbound_status)

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


@functools.cache
def _reported_statement() -> sa.Select:
    # Built once, Core columns (no ORM entities to build and keep in the identity map): what a
    # message.status event carries (events.message_status_data), and the recipient's address.
    return (sa.select(Message.id, Message.contact_id, Message.channel, Message.fallback_of, Message.error_code,
                      Message.error_message, Message.twilio_sid, Message.kind, Message.conversation_id,
                      Message.backend_metadata.label("backend_metadata"), Message.broadcast_id, Message.locale,
                      Contact.phone, Contact.email, Contact.user_id)
            .join(Contact, Contact.id == Message.contact_id)
            .where(Message.id.in_(sa.bindparam("ids", expanding=True))))


def report_statuses(moves: Mapping[str, MessageStatus]) -> None:
    """message.status for each message that just moved to the status given, in the move's
    transaction (invariant 12), with one read for all and one INSERT for all their events
    (events.message_statuses): one event per transition, never one per repeated callback (only
    a move that raised the rank reports)."""
    failures = [message_id for message_id, status in moves.items() if status in fallback.FINAL_FAILURES]
    reported = [message_id for message_id, status in moves.items() if status in REPORTED_STATUSES]
    if not reported and not failures:
        return
    session = db.session()
    if failures:
        # A final failure may hand the notification to the user's next channel, in this same
        # transaction (invariant 13): the fallback needs the messages whole, so the one read is
        # the ORM's (rare: sends accepted and most callbacks take the Core read below).
        read = (sa.select(Message, Contact.phone, Contact.email, Contact.user_id)
                .join(Contact, Contact.id == Message.contact_id)
                .where(Message.id.in_(list(moves))).execution_options(populate_existing=True))
        found = {message.id: (message, phone, email, user_id)
                 for message, phone, email, user_id in session.execute(read)}
    else:
        if session.new or session.dirty or session.deleted:
            session.flush()  # what the read below must see (the ORM's autoflush did it before)
        found = {row.id: (row, row.phone, row.email, row.user_id)
                 for row in session.connection().execute(_reported_statement(), {"ids": reported})}
    events.message_statuses(
        (row, email if row.channel == Channel.EMAIL else phone, moves[message_id].value, user_id)
        for message_id in reported if message_id in found  # in the moves' order
        for row, phone, email, user_id in [found[message_id]])
    if failures:
        fallback.after_failures([found[message_id][0] for message_id in failures if message_id in found])


@functools.cache
def _callback_statement() -> sa.Select:
    """A status callback in one round trip on PostgreSQL (issue 17; docs/ARCHITECTURE.md, "Web
    answers fast"), data-modifying CTEs that depend on each other in this order:

    * `kept`: the status event, linked to its outbound message by SID, `ON CONFLICT (twilio_sid,
      status) DO NOTHING` (a repeat keeps nothing and changes nothing);
    * `target`: that message, locked (`FOR UPDATE`), only if the callback can change it: its rank
      is below the callback's (`rank < :rank`), or the callback brings an error and none is kept
      yet. The lock returns the latest committed version, so `target.rank` is the rank this
      callback raises from, exact under concurrent callbacks of the same message;
    * `raised`: the UPDATE — status, rank and lease only when the rank moves up, the first error
      kept whether or not the status moves (invariant 3), as `raise_status` does in two;
    * `reported`: the `message.status` event (invariant 12) when the rank moved and the status is
      one the backend hears of, with the same fields `events.message_status` writes.

    It returns whether the event was kept, the message's id, whether its rank moved, what a
    fallback depends on, and the `message.status` event's id. Parameters: see `_record_callback_in_one_statement`; none is named
    as a column (SQLAlchemy would add a parameter named as a column to an INSERT's or an UPDATE's
    values).
    """
    messages, kept_table, contacts = Message.__table__, StatusEvent.__table__, Contact.__table__
    rank = sa.bindparam("rank", type_=sa.SmallInteger)
    kept = (postgresql.insert(kept_table).values(
        twilio_sid=sa.bindparam("cb_sid"), status=sa.bindparam("cb_status"),
        error_code=sa.bindparam("cb_error_code", type_=sa.Integer),
        error_message=sa.bindparam("cb_error_message", type_=sa.Text),
        payload=sa.bindparam("cb_payload", type_=kept_table.c.payload.type),
        received_at=sa.bindparam("cb_now", type_=sa.DateTime),
        message_id=sa.select(messages.c.id).where(
            messages.c.twilio_sid == sa.bindparam("cb_sid"), messages.c.direction == Direction.OUTBOUND.value)
        .scalar_subquery())
        .on_conflict_do_nothing(index_elements=["twilio_sid", "status"])
        .returning(kept_table.c.message_id).cte("kept"))
    no_error_yet = sa.and_(messages.c.error_code.is_(None), messages.c.error_message.is_(None))
    target = (sa.select(messages.c.id, messages.c.status_rank.label("rank"))
              .where(messages.c.id == sa.select(kept.c.message_id).scalar_subquery(),
                     sa.or_(messages.c.status_rank < rank, sa.and_(sa.bindparam("has_error", type_=sa.Boolean), no_error_yet)))
              .with_for_update(of=messages).cte("target"))
    moves = target.c.rank < rank
    new_error = sa.and_(sa.bindparam("has_error", type_=sa.Boolean), no_error_yet)
    raised = (sa.update(messages).where(messages.c.id == target.c.id).values(
        status=sa.case((moves, sa.bindparam("new_status", type_=sa.String)), else_=messages.c.status),
        status_rank=sa.case((moves, rank), else_=messages.c.status_rank),
        claimed_until=sa.case((moves, sa.null()), else_=messages.c.claimed_until),
        error_code=sa.case((new_error, sa.bindparam("cb_error_code", type_=sa.Integer)), else_=messages.c.error_code),
        error_message=sa.case((new_error, sa.bindparam("cb_error_message", type_=sa.Text)),
                              else_=messages.c.error_message),
        updated_at=sa.bindparam("cb_now", type_=sa.DateTime))
        .returning(messages.c.id, messages.c.contact_id, messages.c.conversation_id, messages.c.channel,
                   messages.c.fallback_of, messages.c.status, messages.c.error_code, messages.c.error_message,
                   messages.c.twilio_sid, messages.c.kind, messages.c.metadata, messages.c.broadcast_id,
                   messages.c.locale, moves.label("moved"))
        .cte("raised"))
    event_table = Event.__table__
    # The same fields, in the same order, as events.message_status (the backend must not tell
    # which path wrote an event).
    data = sa.func.json_build_object(
        "message_id", raised.c.id, "channel", raised.c.channel, "user_id", contacts.c.user_id,
        "to", sa.case((raised.c.channel == Channel.EMAIL.value, contacts.c.email), else_=contacts.c.phone),
        "fallback_of", raised.c.fallback_of, "status", raised.c.status, "error_code", raised.c.error_code,
        "error_message", raised.c.error_message, "twilio_sid", raised.c.twilio_sid, "kind", raised.c.kind,
        "conversation_id", raised.c.conversation_id, "metadata", raised.c.metadata,
        "broadcast_id", raised.c.broadcast_id, "locale", raised.c.locale, type_=sa.JSON)
    reported = (postgresql.insert(event_table).from_select(
        ["id", "txid", "type", "contact_id", "message_id", "conversation_id", "data", "created_at", "status",
         "attempts", "next_attempt_at"],
        sa.select(sa.bindparam("event_id", type_=sa.String), current_txid(), sa.literal(EventType.MESSAGE_STATUS.value),
                  raised.c.contact_id, raised.c.id, raised.c.conversation_id, data, sa.bindparam("cb_now", type_=sa.DateTime),
                  sa.bindparam("event_status", type_=sa.String), sa.literal(0),
                  sa.bindparam("cb_event_due", type_=sa.DateTime))
        .select_from(raised.join(contacts, contacts.c.id == raised.c.contact_id))
        .where(raised.c.moved, sa.bindparam("report", type_=sa.Boolean)))
        .returning(event_table.c.id).cte("reported"))
    one_row = sa.select(sa.literal(1).label("one")).subquery("one_row")
    return sa.select(
        sa.exists(sa.select(kept.c.message_id)).label("kept"),
        sa.select(kept.c.message_id).scalar_subquery().label("message_id"),
        sa.func.coalesce(raised.c.moved, False).label("moved"),
        # What decides whether a final failure may fall back (fallback.warrants_fallback).
        raised.c.kind, raised.c.channel, raised.c.fallback_of, raised.c.error_code,
        sa.select(reported.c.id).scalar_subquery().label("event_id"),
    ).select_from(one_row.outerjoin(raised, sa.true()))


def _record_callback_in_one_statement(callback: StatusCallback) -> bool:
    """`record_callback` on PostgreSQL: one statement (`_callback_statement`), one commit, an
    enqueue after it only when the backend is pushed the event. Returns False for a repeat."""
    sid, status, parsed = callback.provider_id, callback.status, callback.mapped
    now = utcnow()
    push = parsed in REPORTED_STATUSES and events.pushed(EventType.MESSAGE_STATUS)
    row = db.session.execute(_callback_statement(), {
        "cb_sid": sid, "cb_status": status, "cb_error_code": callback.error_code,
        "cb_error_message": callback.error_message, "cb_payload": callback.payload, "cb_now": now,
        # An unknown status is kept, never applied: a NULL rank raises nothing, and no error is kept.
        "rank": parsed.rank if parsed is not None else None, "new_status": parsed.value if parsed is not None else None,
        "has_error": parsed is not None and (callback.error_code is not None or bool(callback.error_message)),
        "report": parsed in REPORTED_STATUSES, "event_id": new_id(),
        "event_status": (EventStatus.PENDING if push else EventStatus.STORED).value,
        "cb_event_due": now if push else None}).one()
    if not row.kept:
        db.session.rollback()
        log.info("repeated status callback %s %s ignored", sid, status)
        return False
    if row.event_id is not None and push:
        outbox.defer(outbox.Work.EVENT, row.event_id)
    if row.moved and parsed in fallback.FINAL_FAILURES and fallback.warrants_fallback(Message(
            direction=Direction.OUTBOUND, kind=row.kind, channel=row.channel, fallback_of=row.fallback_of,
            error_code=row.error_code)):
        # Rare (a final failure another channel may get around): the fallback reads the message
        # whole, in this transaction (invariant 13).
        message = db.session.get(Message, row.message_id, populate_existing=True)
        fallback.after_failures([message] if message is not None else [])
    db.session.commit()
    if row.message_id is None:
        # The send has not recorded this SID yet (or it is not ours). Looked for again after the
        # commit, as the sender looks for early events after committing its SID: one of the two
        # always sees the other.
        apply_pending_events(sid)
    elif parsed is None:
        log.warning("status callback with unknown status %r for %s kept, not applied", status, sid)
    return True


def record_callback(callback: StatusCallback) -> bool:
    """Store a status callback (parsed by its channel: bot.channels.whatsapp.callbacks) as an
    event and apply it. Returns False for a repeat.

    On PostgreSQL one statement and one commit (`_callback_statement`). Elsewhere (SQLite has no
    data-modifying CTE) two statements when the message is known (most callbacks): the event's
    INSERT links it to its message in the same statement, and only this event is applied. When
    the SID is not recorded yet, the sender applies the event once it is (`apply_pending_events`).
    """
    if db.session.get_bind().dialect.name == "postgresql":
        return _record_callback_in_one_statement(callback)
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
