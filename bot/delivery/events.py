"""Events to the backend: facts written in the same transaction as the change they report.

`emit` adds an `Event` row to the current session and defers its delivery with the outbox, so a
rolled-back change leaves no event and a committed one always has its event (invariant 12; the
same transactional outbox as sends). What each type carries is built here, from the rows, so
every caller reports a message, a conversation or a contact the same way. Delivery is
`bot.delivery.event_delivery`.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable

import sqlalchemy as sa
from flask import current_app

from bot.clock import isoformat, utcnow
from bot.delivery import outbox
from bot.extensions import db
from bot.models import Contact, Conversation, Event, Message, new_id
from bot.vocabulary import Channel, ConversationStatus, EventStatus, EventType

#: A conversation's end status -> the event that reports it.
CONVERSATION_ENDED = {
    ConversationStatus.COMPLETED: EventType.CONVERSATION_COMPLETED,
    ConversationStatus.EXPIRED: EventType.CONVERSATION_EXPIRED,
    ConversationStatus.CANCELLED: EventType.CONVERSATION_CANCELLED,
    ConversationStatus.FAILED: EventType.CONVERSATION_FAILED,
}


def pushed(event_type: str) -> bool:
    """Whether events of this type go to EVENTS_WEBHOOK_URL (set, and not filtered by EVENTS_TYPES)."""
    cfg = current_app.config
    if not cfg.get("EVENTS_WEBHOOK_URL"):
        return False
    wanted = cfg.get("EVENTS_TYPES") or []
    return not wanted or event_type in wanted


def emit(event_type: EventType, data: dict[str, Any], *, contact_id: int | None,
         message_id: str | None = None, conversation_id: str | None = None) -> Event:
    """Record an event in the current transaction; its delivery is enqueued once it commits.

    Does not commit: the caller's commit is the change's and the event's at once.
    """
    push = pushed(event_type)
    event = Event(type=event_type, data=data, contact_id=contact_id, message_id=message_id,
                  conversation_id=conversation_id, created_at=utcnow(),
                  status=EventStatus.PENDING if push else EventStatus.STORED,
                  next_attempt_at=utcnow() if push else None, attempts=0)
    db.session.add(event)
    if push:
        outbox.defer(outbox.Work.EVENT, event)
    return event


def message_status_data(message: Message | Any, to: str | None, status: str, error_code: int | None,
                        error_message: str | None, user_id: str | None = None) -> dict[str, Any]:
    """What a message.status event carries, in this order (the callback's one-statement path,
    statuses._callback_statement, builds the same fields in SQL); `message` is a Message or a
    row with its columns."""
    return {
        "message_id": message.id,
        "channel": message.channel,
        "user_id": user_id,
        "to": to,
        "fallback_of": message.fallback_of,
        "status": status,
        "error_code": error_code,
        "error_message": error_message,
        "twilio_sid": message.twilio_sid,
        "kind": message.kind,
        "conversation_id": message.conversation_id,
        "metadata": message.backend_metadata,
        "broadcast_id": message.broadcast_id,
        "locale": message.locale,
    }


def message_status(message: Message | Any, to: str | None, status: str, error_code: int | None,
                   error_message: str | None, user_id: str | None = None) -> Event:
    """message.status: an outbound message moved to `status` (one event per transition); `to` is
    the phone number or the email address, as the message's channel has it."""
    return emit(EventType.MESSAGE_STATUS, message_status_data(message, to, status, error_code, error_message, user_id),
                contact_id=message.contact_id, message_id=message.id, conversation_id=message.conversation_id)


@functools.cache
def _insert_events() -> sa.Insert:
    # Built once and run as an executemany: the same short statement for any number of rows, so
    # psycopg converts it once and pipelines the rows. Through the ORM's flush the events went
    # out as one INSERT of every row's values, RETURNING their keys: a statement as long as the
    # batch, parsed anew each time (bench/THROUGHPUT.md, "Issue 17: the batch's record").
    # `txid` is the column's SQL default (models.current_txid), rendered into the statement.
    return sa.insert(Event.__table__)


def message_statuses(reports: Iterable[tuple[Any, str | None, str, str | None]]) -> list[str]:
    """message.status for several messages at once, each `(row, to, status, user_id)` with `row`
    a Message or a row of its columns as they are after the move (its error code and message
    are the event's): the same rows `message_status` adds one by one, written now in one
    statement (Core, no unit of work) in the order given. Returns their ids.

    Does not commit; their delivery is enqueued once the caller's transaction commits. Rows the
    session holds unflushed are flushed first, so events keep the order they were emitted in
    (invariant 12).
    """
    push = pushed(EventType.MESSAGE_STATUS)
    now = utcnow()
    status, due = (EventStatus.PENDING, now) if push else (EventStatus.STORED, None)
    values = [{"id": new_id(), "type": EventType.MESSAGE_STATUS.value, "contact_id": row.contact_id,
               "message_id": row.id, "conversation_id": row.conversation_id,
               "data": message_status_data(row, to, moved_to, row.error_code, row.error_message, user_id),
               "created_at": now, "status": status.value, "attempts": 0, "next_attempt_at": due}
              for row, to, moved_to, user_id in reports]
    if not values:
        return []
    session = db.session()
    if session.new or session.dirty or session.deleted:
        session.flush()
    session.connection().execute(_insert_events(), values)
    if push:
        for value in values:
            outbox.defer(outbox.Work.EVENT, value["id"])
    return [value["id"] for value in values]


def message_received(message: Message, contact: Contact, *, conversation: Conversation | None,
                     answered: bool, handoff: bool) -> Event:
    """message.received: what a person wrote, where it went, and whether the bot answered it."""
    payload = message.payload or {}
    media = [{"url": url, "content_type": payload.get(f"MediaContentType{i}")}
             for i, url in enumerate(message.media_urls or [])]
    location = None
    if payload.get("Latitude") and payload.get("Longitude"):
        location = {"latitude": payload["Latitude"], "longitude": payload["Longitude"],
                    "address": payload.get("Address"), "label": payload.get("Label")}
    button = None
    if payload.get("ButtonPayload") or payload.get("ButtonText"):
        button = {"payload": payload.get("ButtonPayload"), "text": payload.get("ButtonText")}
    return emit(EventType.MESSAGE_RECEIVED, {
        "message_id": message.id,
        "channel": message.channel,
        "user_id": contact.user_id,
        "from": contact.phone,
        "profile_name": contact.profile_name,
        "body": message.body,
        "media": media,
        "location": location,
        "button": button,
        "twilio_sid": message.twilio_sid,
        "received_at": isoformat(message.created_at),
        "conversation_id": conversation.id if conversation else None,
        "flow": conversation.flow if conversation else None,
        "answered": answered,
        "handoff": handoff,
    }, contact_id=contact.id, message_id=message.id, conversation_id=conversation.id if conversation else None)


def conversation_event(event_type: EventType, conversation: Conversation, phone: str) -> Event:
    """conversation.started / completed / expired / cancelled / failed, with flow, state, outcome."""
    return emit(event_type, {
        "conversation_id": conversation.id,
        "contact": phone,
        "flow": conversation.flow,
        "state": conversation.state,
        "status": conversation.status,
        "outcome": conversation.outcome,
        "error": conversation.error,
        "started_by": conversation.started_by,
        "metadata": conversation.backend_metadata,
    }, contact_id=conversation.contact_id, conversation_id=conversation.id)


def consent_changed(contact: Contact, opted_in: bool, *, previous: str, source: str, words: str | None,
                    message_sid: str | None, channel: str = Channel.WHATSAPP) -> Event:
    """contact.opted_in / contact.opted_out on one channel, with source and words as in the ledger."""
    return emit(EventType.CONTACT_OPTED_IN if opted_in else EventType.CONTACT_OPTED_OUT, {
        "contact": contact.phone, "user_id": contact.user_id, "channel": channel, "previous": previous,
        "source": source, "words": words, "message_sid": message_sid,
    }, contact_id=contact.id)


def handoff_changed(contact: Contact, started: bool, *, reason: str | None, by: str) -> Event:
    """contact.handoff_started / contact.handoff_ended: who (api, flow, expiry) and why."""
    return emit(EventType.CONTACT_HANDOFF_STARTED if started else EventType.CONTACT_HANDOFF_ENDED, {
        "contact": contact.phone, "reason": reason, "by": by,
        "until": isoformat(contact.handoff_until) if started else None,
    }, contact_id=contact.id)


def message_held(message_id: str, *, contact_id: int, channel: str, kind: str, to: str | None,
                 user_id: str | None, held_until: Any, reason: str, send_at: Any,
                 metadata: dict[str, Any] | None, locale: str | None = None) -> Event:
    """message.held: a message waits in the database until `held_until` (its send_at, or the
    end of the recipient's quiet hours, when it is made or when its send comes due inside them:
    invariant 15). A new type, so a receiver that filters on message.status sees exactly what it
    saw before."""
    return emit(EventType.MESSAGE_HELD, {
        "message_id": message_id, "channel": channel, "user_id": user_id, "to": to, "kind": kind,
        "held_until": isoformat(held_until), "reason": reason, "send_at": isoformat(send_at),
        "metadata": metadata, "locale": locale,
    }, contact_id=contact_id, message_id=message_id)


def conversation_held(conversation: Conversation, *, phone: str, user_id: str | None, reason: str) -> Event:
    """conversation.held: a backend-started flow waits in the database until `held_until` (its
    send_at, or the end of the user's quiet hours) before it starts (invariant 15), as
    message.held says of a message; conversation.started follows when it starts, or
    conversation.cancelled if the backend calls it back first."""
    return emit(EventType.CONVERSATION_HELD, {
        "conversation_id": conversation.id, "contact": phone, "user_id": user_id, "flow": conversation.flow,
        "held_until": isoformat(conversation.not_before), "reason": reason,
        "send_at": isoformat(conversation.send_at), "started_by": conversation.started_by,
        "metadata": conversation.backend_metadata,
    }, contact_id=conversation.contact_id, conversation_id=conversation.id)


def message_canceled(message: Message | Any, to: str | None, user_id: str | None) -> Event:
    """message.canceled: the backend canceled a message before it left; it never will."""
    return emit(EventType.MESSAGE_CANCELED, {
        "message_id": message.id, "channel": message.channel, "user_id": user_id, "to": to,
        "kind": message.kind, "send_at": isoformat(message.send_at), "metadata": message.backend_metadata,
        "locale": message.locale,
    }, contact_id=message.contact_id, message_id=message.id)
