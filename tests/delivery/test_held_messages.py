"""Held messages wait in the database and leave when their time comes (invariant 15): the claim
honours `not_before`, a held message holds nobody else back, the release finds due ones without
the queue, and a cancel stops one for good."""
from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import claims, outbox, release, sender
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Event, Message
from bot.vocabulary import Direction, EventType, MessageStatus
from tests.conftest import make_contact, run_queue

PHONE = "+15551234567"


def held_message(contact_id: int, body: str, until, **extra) -> Message:
    """A pending message held until `until`, committed, its (hint) task not enqueued."""
    row = Message(direction=Direction.OUTBOUND, contact_id=contact_id, body=body, status=MessageStatus.PENDING,
                  status_rank=MessageStatus.PENDING.rank, not_before=until, **extra)
    db.session.add(row)
    db.session.commit()
    return row


def test_a_held_message_is_not_claimed_before_its_time(app, twilio):
    with app.app_context():
        contact = make_contact(PHONE)
        row = held_message(contact.id, "later", utcnow() + timedelta(hours=1))
        assert claims.claim(row.id) is None
        assert sender.deliver(row.id) == sender.Outcome.NOT_CLAIMED
        assert claims.claim_along("0" * 32, 10) == []  # nor taken along by another batch
        assert twilio.messages == []
        db.session.expire_all()
        assert db.session.get(Message, row.id).status == MessageStatus.PENDING


def test_a_held_message_holds_no_later_message_of_its_contact_back(app, client, auth, twilio):
    with app.app_context():
        contact = make_contact(PHONE)
        held = held_message(contact.id, "tomorrow", utcnow() + timedelta(days=1))
        response = client.post("/notify", json={"to": PHONE, "body": "now"}, headers=auth)
        assert response.status_code == 202
        run_queue()
        assert [m["body"] for m in twilio.messages] == ["now"]
        db.session.expire_all()
        assert db.session.get(Message, held.id).status == MessageStatus.PENDING


def test_a_waiting_message_is_handed_its_turn_past_a_held_one(app, client, auth, twilio):
    # first (in flight), held (created before second), second (waiting for first): when first
    # is accepted, the turn goes to second, not to the held message.
    with app.app_context():
        make_contact(PHONE)
        first = client.post("/notify", json={"to": PHONE, "body": "first"}, headers=auth).get_json()["id"]
        first_task = huey.dequeue()
        contact_id = db.session.get(Message, first).contact_id
        held = held_message(contact_id, "held", utcnow() + timedelta(days=1))
        second = client.post("/notify", json={"to": PHONE, "body": "second"}, headers=auth).get_json()["id"]
        assert sender.deliver(second) == sender.Outcome.WAITING
        huey.execute(first_task)
        # Only the hand-over may enqueue the second now: nothing else is on the queue.
        run_queue(include_scheduled=False)
        assert [m["body"] for m in twilio.messages] == ["first", "second"]
        db.session.expire_all()
        assert db.session.get(Message, held.id).status == MessageStatus.PENDING


def test_the_release_enqueues_due_held_messages_only(app, twilio):
    with app.app_context():
        contact = make_contact(PHONE)
        now = utcnow()
        due = held_message(contact.id, "due", now - timedelta(seconds=1))
        later = held_message(contact.id, "later", now + timedelta(minutes=10))
        assert release.release_due(now) == 1
        assert release.release_due(now) == 0  # released once: no longer held
        task = huey.dequeue()
        assert task.args == (due.id,) and huey.dequeue() is None
        huey.execute(task)
        assert [m["body"] for m in twilio.messages] == ["due"]
        db.session.expire_all()
        assert db.session.get(Message, later.id).not_before is not None
        assert release.release_due(now + timedelta(minutes=10)) == 1
        run_queue()
        assert [m["body"] for m in twilio.messages] == ["due", "later"]


def test_the_outbox_sweep_leaves_held_messages_to_the_release(app):
    with app.app_context():
        contact = make_contact(PHONE)
        row = held_message(contact.id, "later", utcnow() + timedelta(hours=2))
        db.session.execute(sa.update(Message).values(created_at=utcnow() - timedelta(hours=1)))
        db.session.commit()
        assert outbox.sweep()["outbound"] == 0
        assert huey.dequeue() is None
        db.session.expire_all()
        assert db.session.get(Message, row.id).next_attempt_at is None


def test_cancel_stops_a_held_message_for_good_and_reports_it(app, twilio):
    with app.app_context():
        contact = make_contact(PHONE)
        row = held_message(contact.id, "never", utcnow() - timedelta(seconds=1))
        outcome, message = release.cancel(row.id)
        assert outcome == release.Cancel.CANCELED and message.status == MessageStatus.CANCELED
        assert release.release_due() == 0
        assert sender.deliver(row.id) == sender.Outcome.NOT_CLAIMED
        assert twilio.messages == []
        assert release.cancel(row.id)[0] == release.Cancel.CANCELED  # again: the same answer
        events = db.session.scalars(sa.select(Event).where(Event.message_id == row.id)).all()
        assert [event.type for event in events] == [EventType.MESSAGE_CANCELED]
        assert events[0].data["message_id"] == row.id


def test_cancel_is_too_late_once_a_message_is_claimed_or_sent(app, twilio):
    with app.app_context():
        contact = make_contact(PHONE)
        row = held_message(contact.id, "going", None)
        assert claims.claim(row.id) is not None
        assert release.cancel(row.id)[0] == release.Cancel.TOO_LATE
        assert release.cancel("f" * 32)[0] == release.Cancel.NOT_FOUND
