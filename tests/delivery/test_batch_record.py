"""The record of a batch the providers accepted: the same rows as the ORM wrote, in few statements.

`sender._record_accepted_rows` writes a batch's provider ids and its `message.status` events
with Core statements built once (docs/ARCHITECTURE.md, invariant 12; bench/THROUGHPUT.md,
"Issue 17: the batch's record"). The events must be the very rows the ORM's path wrote before
(`events.message_status` per message, flushed by the unit of work): same columns, same data,
the data's keys in the same order, delivery enqueued after the commit when the backend is pushed
events. The reference below is that path, as it was.
"""
from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from bot.channels.outcomes import Accepted
from bot.clock import utcnow
from bot.delivery import claims, events, outbox, sender, statuses
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Broadcast, Contact, Conversation, Event, Message
from bot.vocabulary import Channel, Direction, EventStatus, EventType, Kind, MessageStatus

#: Columns an event has that the path writing it cannot decide alike twice (its keys, its time).
UNCOMPARED = {"seq", "id", "created_at", "next_attempt_at", "txid"}


def _messages() -> list[str]:
    """Claimed outbound messages of every shape a message.status event reports: a reply in a
    conversation, a broadcast's, an email with metadata, a fallback of another message, a
    contact with a user id and one without."""
    now = utcnow()
    alice = Contact(phone="+15550000001", user_id="user-alice", consent="opted_in", last_inbound_at=now)
    bob = Contact(phone="+15550000002", consent="opted_in", last_inbound_at=now)
    carol = Contact(email="carol@example.com", user_id="user-carol", email_consent="opted_in")
    db.session.add_all([alice, bob, carol])
    db.session.flush()
    conversation = Conversation(contact_id=bob.id, flow="feedback", started_by="inbound")
    broadcast = Broadcast(state="sending", body="Hi all", backend_metadata={"campaign": "spring"})
    db.session.add_all([conversation, broadcast])
    db.session.flush()
    first = Message(direction=Direction.OUTBOUND, kind=Kind.NOTIFICATION, contact_id=carol.id, body="x",
                    status=MessageStatus.FAILED, status_rank=MessageStatus.FAILED.rank, channel=Channel.WHATSAPP)
    db.session.add(first)
    db.session.flush()
    rows = [
        Message(direction=Direction.OUTBOUND, kind=Kind.NOTIFICATION, contact_id=alice.id, body="a",
                backend_metadata={"order": 42, "tags": ["x", "y"]}),
        Message(direction=Direction.OUTBOUND, kind=Kind.REPLY, contact_id=bob.id, body="b",
                conversation_id=conversation.id),
        Message(direction=Direction.OUTBOUND, kind=Kind.BROADCAST, contact_id=bob.id, body="c",
                broadcast_id=broadcast.id, backend_metadata={"campaign": "spring"}),
        Message(direction=Direction.OUTBOUND, kind=Kind.NOTIFICATION, contact_id=carol.id, body="d",
                channel=Channel.EMAIL, subject="Hello", fallback_of=first.id, backend_metadata={"k": None}),
    ]
    for row in rows:
        row.status, row.status_rank = MessageStatus.DISPATCHING, MessageStatus.DISPATCHING.rank
        row.claimed_until, row.attempts = now + timedelta(minutes=1), 1  # a live claim
    db.session.add_all(rows)
    db.session.commit()
    return [row.id for row in rows]


def _claimed(ids: list[str]) -> list[sa.Row]:
    return db.session.connection().execute(sa.select(*Message.__table__.c).where(Message.id.in_(ids))).all()


def _accepted(rows: list[sa.Row]) -> list[tuple[sender._Send, Accepted]]:
    batch = []
    for row in rows:
        channel = sender.CHANNELS[row.channel]
        provider_id = "SM" + uuid.uuid4().hex if row.channel == Channel.WHATSAPP else "sg-" + uuid.uuid4().hex
        status = MessageStatus.QUEUED if row.channel == Channel.WHATSAPP else MessageStatus.SENT
        batch.append((sender._Send(row, channel, None, "key", 80), Accepted(provider_id, status.value)))
    return batch


def _written() -> list[dict[str, Any]]:
    """The message.status events, in their order, with the data's keys in their stored order."""
    found = db.session.execute(sa.select(Event).where(Event.type == EventType.MESSAGE_STATUS)
                               .order_by(Event.txid, Event.seq)).scalars().all()
    return [{**{c.key: getattr(event, c.key) for c in sa.inspect(Event).column_attrs if c.key not in UNCOMPARED},
             "data": json.dumps(event.data), "due": event.next_attempt_at is not None} for event in found]


def _reference(moves: dict[str, MessageStatus]) -> None:
    """report_statuses as it was before Core (main at e412d8d): the ORM's read, one
    `events.message_status` per row, the unit of work's INSERT."""
    rows = db.session.execute(
        sa.select(Message, Contact.phone, Contact.email, Contact.user_id).join(Contact, Contact.id == Message.contact_id)
        .where(Message.id.in_(list(moves))).execution_options(populate_existing=True)).all()
    for message, phone, email, user_id in rows:
        to = email if message.channel == Channel.EMAIL else phone
        events.emit(EventType.MESSAGE_STATUS, {  # events.message_status's fields, as they were
            "message_id": message.id,
            "channel": message.channel,
            "user_id": user_id,
            "to": to,
            "fallback_of": message.fallback_of,
            "status": moves[message.id].value,
            "error_code": message.error_code,
            "error_message": message.error_message,
            "twilio_sid": message.twilio_sid,
            "kind": message.kind,
            "conversation_id": message.conversation_id,
            "metadata": message.backend_metadata,
            "broadcast_id": message.broadcast_id,
            "locale": message.locale,  # carried since the message's locale became data (0013)
        }, contact_id=message.contact_id, message_id=message.id, conversation_id=message.conversation_id)
    db.session.flush()


@pytest.mark.parametrize("pushed", [False, True], ids=["stored", "pushed"])
def test_a_batchs_events_are_the_rows_the_orm_wrote(app, pushed):
    if pushed:
        app.config["EVENTS_WEBHOOK_URL"] = "http://127.0.0.1:9/events"
    with app.app_context():
        ids = _messages()
        batch = _accepted(_claimed(ids))
        outcomes = sender._record_accepted_rows(batch)
        assert outcomes == {item.row.id: sender.Outcome.SENT for item, _ in batch}
        written = _written()
        # Every row moved and has its provider id (its status only went up: dispatching -> queued/sent).
        recorded = {row.id: row for row in db.session.execute(sa.select(Message).where(Message.id.in_(ids))).scalars()}
        for item, result in batch:
            row = recorded[item.row.id]
            assert row.status == result.status and row.status_rank == MessageStatus(result.status).rank
            assert getattr(row, item.channel.provider_id_column) == result.provider_id
        # The backend is pushed the events after the commit, each once.
        queued = {task.args[0] for task in huey.pending() if task.name.endswith("deliver_event")}
        event_ids = set(db.session.scalars(sa.select(Event.id).where(Event.type == EventType.MESSAGE_STATUS)))
        assert queued == (event_ids if pushed else set())

        # The same messages, reported again by the ORM's path, in the batch's order.
        db.session.execute(sa.delete(Event))
        db.session.commit()
        _reference({item.row.id: MessageStatus(result.status) for item, result in batch})
        reference = _written()
        db.session.rollback()

    assert len(written) == len(ids) == 4
    key = lambda event: event["message_id"]  # noqa: E731  (the ORM's read had no order)
    assert sorted(written, key=key) == sorted(reference, key=key)
    assert [event["message_id"] for event in written] == [item.row.id for item, _ in batch]  # the batch's order
    by_message = {event["message_id"]: event for event in written}
    email = next(item.row for item, _ in batch if item.row.channel == Channel.EMAIL)
    assert json.loads(by_message[email.id]["data"])["to"] == "carol@example.com"
    assert json.loads(by_message[email.id]["data"])["user_id"] == "user-carol"
    broadcast = next(item.row for item, _ in batch if item.row.kind == Kind.BROADCAST)
    assert json.loads(by_message[broadcast.id]["data"])["broadcast_id"] == broadcast.broadcast_id
    assert {event["status"] for event in written} == {(EventStatus.PENDING if pushed else EventStatus.STORED).value}
    assert {event["due"] for event in written} == {pushed}


def test_events_already_added_to_the_session_keep_their_order(app):
    """A report written by Core goes after the events the transaction emitted before it, as the
    ORM's autoflush ordered them (invariant 12: per-contact order)."""
    with app.app_context():
        ids = _messages()
        contact_id = db.session.scalar(sa.select(Message.contact_id).where(Message.id == ids[0]))
        events.emit(EventType.CONTACT_OPTED_IN, {"contact": "+15550000001"}, contact_id=contact_id)
        statuses.report_statuses({ids[0]: MessageStatus.SENT})
        db.session.commit()
        order = db.session.scalars(sa.select(Event.type).order_by(Event.txid, Event.seq)).all()
    assert order == [EventType.CONTACT_OPTED_IN, EventType.MESSAGE_STATUS]


@pytest.mark.parametrize("size", [1, 3])
def test_a_batchs_record_is_four_statements_whatever_its_size(app, size):
    """The update (one executemany per provider id column: these are WhatsApp's), the events'
    read and their INSERT (one executemany), then one read for early callbacks and waiting
    contacts: a batch of one (the replies' hand-over) pays the same four as a batch of fifty."""
    with app.app_context():
        ids = _messages()[:size]  # WhatsApp's
        batch = _accepted(_claimed(ids))
        db.session.commit()
        seen: list[str] = []

        def count(conn, cursor, statement, *rest) -> None:  # noqa: ANN001
            seen.append(statement)

        sa.event.listen(db.engine, "before_cursor_execute", count)
        try:
            sender._record_accepted_rows(batch)
        finally:
            sa.event.remove(db.engine, "before_cursor_execute", count)
    assert len(seen) == 4, seen


def test_claim_many_returns_the_claimed_rows_whole(app):
    """claim_many on the session's connection (Core) returns what the ORM's path returned:
    every column, the claim's own values among them; a message it cannot claim is left alone."""
    with app.app_context():
        ids = _messages()
        db.session.execute(sa.update(Message).where(Message.id.in_(ids[:2]))
                           .values(status=MessageStatus.PENDING, status_rank=0, claimed_until=None, attempts=0))
        db.session.commit()
        rows = claims.claim_many(ids[:2] + [ids[3]])  # the last is dispatching under a live claim
        assert sorted(row.id for row in rows) == sorted(ids[:2])
        assert set(rows[0]._fields) == {c.key for c in Message.__table__.c}
        assert {(row.status, row.attempts) for row in rows} == {(MessageStatus.DISPATCHING, 1)}
        assert all(row.claimed_until > utcnow() for row in rows)
        assert outbox  # the module the reference path defers through is loaded
