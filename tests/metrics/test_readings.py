"""bot/metrics/readings.py: the figures read from the database and the queue at scrape time."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import outbox
from bot.delivery.queue import huey
from bot.extensions import db
from bot.metrics import readings as readings_module
from bot.metrics.readings import LANES, read_readings
from bot.models import Contact, Conversation, Event, Message
from bot.vocabulary import (Channel, ConversationStatus, Direction, EventStatus, EventType, Kind, MessageStatus,
                            StartedBy)


def _message(contact: Contact, status: MessageStatus, *, channel: Channel = Channel.WHATSAPP,
             kind: Kind = Kind.NOTIFICATION, direction: Direction = Direction.OUTBOUND, age: timedelta = timedelta(0),
             error_code: int | None = None) -> Message:
    message = Message(contact_id=contact.id, direction=direction, kind=kind, channel=channel, status=status,
                      status_rank=status.rank, body="hi", error_code=error_code, created_at=utcnow() - age)
    db.session.add(message)
    return message


def test_readings_count_what_the_database_holds(app):
    with app.app_context():
        ada = Contact(phone="+15550000001", email="ada@example.test", handoff_until=utcnow() + timedelta(hours=1))
        bob = Contact(phone="+15550000002", handoff_until=utcnow() - timedelta(hours=1))  # handoff over
        db.session.add_all([ada, bob])
        db.session.flush()
        for _ in range(3):
            _message(ada, MessageStatus.SENT)
        _message(ada, MessageStatus.FAILED, error_code=63016)
        _message(ada, MessageStatus.FAILED, error_code=63016)
        _message(ada, MessageStatus.UNDELIVERED, error_code=63024)
        _message(ada, MessageStatus.FAILED, channel=Channel.EMAIL)
        _message(ada, MessageStatus.FAILED, error_code=63003).updated_at = utcnow() - timedelta(hours=25)  # too old
        _message(ada, MessageStatus.PENDING, age=timedelta(minutes=10))  # bulk
        _message(ada, MessageStatus.RETRYING, kind=Kind.REPLY, age=timedelta(minutes=3))  # conversation
        _message(bob, MessageStatus.PENDING, kind=Kind.REPLY, age=timedelta(minutes=1))
        _message(ada, MessageStatus.DISPATCHING, channel=Channel.EMAIL, age=timedelta(seconds=30))  # email
        # Held until tomorrow (send_at): waiting, but not late; it ages no lane.
        _message(ada, MessageStatus.PENDING, age=timedelta(hours=2)).not_before = utcnow() + timedelta(days=1)
        # Held until 20 s ago, made an hour ago: late by 20 s, not by an hour.
        _message(ada, MessageStatus.PENDING, kind=Kind.BROADCAST, age=timedelta(hours=1)).not_before = (
            utcnow() - timedelta(seconds=20))
        _message(bob, MessageStatus.RECEIVED, kind=Kind.INBOUND, direction=Direction.INBOUND, age=timedelta(hours=5))
        for status in (EventStatus.PENDING, EventStatus.PENDING, EventStatus.FAILED, EventStatus.DELIVERED):
            db.session.add(Event(type=EventType.MESSAGE_STATUS, contact_id=ada.id, data={}, status=status,
                                 created_at=utcnow() - timedelta(minutes=2)))
        for flow, status in (("survey", ConversationStatus.ACTIVE), ("survey", ConversationStatus.STARTING),
                             ("welcome", ConversationStatus.ACTIVE), ("welcome", ConversationStatus.COMPLETED)):
            db.session.add(Conversation(contact_id=ada.id, flow=flow, status=status, started_by=StartedBy.USER))
        db.session.commit()

        readings = read_readings(db.session)

    assert readings.database_up and readings.queue_up
    assert readings.message_count(MessageStatus.SENT) == 3
    assert readings.messages[(Channel.WHATSAPP, Direction.OUTBOUND, MessageStatus.FAILED)] == 3
    assert readings.messages[(Channel.WHATSAPP, Direction.INBOUND, MessageStatus.RECEIVED)] == 1
    assert readings.failed_by_error_code == {("whatsapp", "63016"): 2, ("whatsapp", "63024"): 1, ("email", "none"): 1}
    ages = readings.oldest_pending_age_seconds
    assert set(ages) == set(LANES) == {"conversation", "bulk", "email", "broadcast"}
    assert 595 <= ages["bulk"] <= 620 and 175 <= ages["conversation"] <= 200 and 25 <= ages["email"] <= 50
    assert 15 <= ages["broadcast"] <= 40
    assert readings.oldest_pending_age == ages["bulk"]
    assert readings.events == {("backend", "pending"): 2, ("backend", "failed"): 1}
    assert readings.events_waiting() == 2 and readings.events_failed() == 1
    assert 115 <= readings.oldest_event_age_seconds <= 140
    assert readings.contacts_in_handoff == 1
    assert readings.conversations_active == {"survey": 2, "welcome": 1}


def test_queue_depth_per_lane(app):
    with app.app_context():
        for priority, count in ((outbox.Priority.CONVERSATION, 2), (outbox.Priority.BULK, 3), (outbox.Priority.EMAIL, 1)):
            for number in range(count):
                outbox.enqueue(outbox.Work.SEND, f"{priority.name}-{number}", priority)
        outbox.enqueue(outbox.Work.SEND, "later", outbox.Priority.BULK, delay=timedelta(hours=1))
        readings = read_readings(db.session)
    # A delayed task waits in its lane until a consumer moves it to the schedule (huey's way).
    assert readings.queue_depth == {"conversation": 2, "bulk": 4, "email": 1, "broadcast": 0}
    assert readings.queue_scheduled == 0
    huey.flush()


def test_an_empty_deployment_reads_zeros(app):
    with app.app_context():
        readings = read_readings(db.session)
    assert readings.database_up and readings.queue_up
    assert readings.messages == {} and readings.events == {}
    assert readings.oldest_pending_age_seconds == dict.fromkeys(LANES, 0.0)
    assert readings.queue_depth == dict.fromkeys(LANES, 0)
    assert readings.contacts_in_handoff == 0 and readings.oldest_pending_age == 0.0


def test_an_unreachable_database_is_flagged_not_raised(app, monkeypatch):
    with app.app_context():
        db.engine.dispose()
        monkeypatch.setattr(db.engine.pool, "connect", lambda: (_ for _ in ()).throw(ConnectionError("down")))
        readings = read_readings(db.session)
    assert not readings.database_up and readings.queue_up
    assert readings.messages == {}


def test_a_big_table_estimates_final_statuses_and_counts_the_live_ones(app, monkeypatch):
    """Beyond EXACT_COUNT_LIMIT, PostgreSQL's statistics estimate the final statuses. A table this
    small is sampled whole by ANALYZE, so the estimate must equal the count exactly."""
    with app.app_context():
        if db.engine.dialect.name != "postgresql":
            pytest.skip("estimates come from PostgreSQL's extended statistics")
        monkeypatch.setattr(readings_module, "EXACT_COUNT_LIMIT", 10)
        ada = Contact(phone="+15550000001")
        db.session.add(ada)
        db.session.flush()
        for status, count in ((MessageStatus.DELIVERED, 30), (MessageStatus.READ, 12), (MessageStatus.PENDING, 4)):
            for _ in range(count):
                _message(ada, status)
        _message(ada, MessageStatus.FAILED, channel=Channel.EMAIL)
        db.session.commit()
        exact = read_readings(db.session).messages  # no statistics yet: counted
        with db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE messages"))
        readings = read_readings(db.session)
    assert readings.messages_estimated
    assert readings.messages == exact == {("whatsapp", "outbound", "delivered"): 30,
                                          ("whatsapp", "outbound", "read"): 12,
                                          ("whatsapp", "outbound", "pending"): 4, ("email", "outbound", "failed"): 1}
