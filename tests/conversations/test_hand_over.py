"""A turn hands its reply to the worker's sender without a trip through the queue (issue 17),
and the outbox's sweep is still the safety net when the worker dies before it leaves
(invariant 1)."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot import create_app
from bot.clock import utcnow
from bot.delivery import outbox, sender
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import Direction, MessageStatus
from tests.conftest import in_process_queue_options, inbound_form, make_contact, run_queue


@pytest.fixture
def handing_app(app, base_config):
    """The test app's database and queue, with HAND_OVER_REPLIES on (the production default)."""
    handing = create_app({**base_config, "TESTING": True, "HAND_OVER_REPLIES": True,
                          "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    yield handing
    with handing.app_context():
        db.session.remove()
        db.engine.dispose()


def reply_rows() -> list[Message]:
    db.session.expire_all()
    return list(db.session.scalars(sa.select(Message).where(Message.direction == Direction.OUTBOUND)))


def test_a_turns_reply_reaches_twilio_with_no_send_task(handing_app, post_webhook, twilio):
    with handing_app.app_context():
        make_contact()
    assert post_webhook(inbound_form(body="feedback")).status_code == 200
    tasks = [task.name for task in huey.pending()]
    assert [name.rsplit(".", 1)[-1] for name in tasks] == ["process_inbound"]
    task = huey.dequeue()
    with handing_app.app_context():
        huey.execute(task)  # the turn, in this app: its reply is handed over after the commit
    sent = twilio.wait_for_messages(1, timeout=10)
    assert "rate us" in sent[0]["body"]
    assert huey.pending() == []  # no send_message task: the reply never went through the queue
    with handing_app.app_context():
        sender.drain_hand_overs(5)
        (reply,) = reply_rows()
        assert (reply.status, reply.twilio_sid, reply.attempts) == (MessageStatus.QUEUED, sent[0]["sid"], 1)


def test_a_reply_whose_hand_over_never_ran_is_sent_by_the_sweep(handing_app, post_webhook, twilio, monkeypatch):
    """The worker dies between the turn's commit and the send: the reply is committed `pending`
    with no task anywhere; the sweep enqueues it once it is a minute old, and it is sent once."""
    monkeypatch.setattr(sender._hand_over, "take", lambda *args: True)  # taken, then the process "dies"
    with handing_app.app_context():
        make_contact()
    post_webhook(inbound_form(body="feedback"))
    task = huey.dequeue()
    with handing_app.app_context():
        huey.execute(task)
    assert huey.pending() == [] and twilio.messages == []
    with handing_app.app_context():
        (reply,) = reply_rows()
        assert reply.status == MessageStatus.PENDING
        assert outbox.sweep(now=utcnow() + timedelta(seconds=61))["outbound"] == 1
    run_queue()
    assert len(twilio.messages) == 1
    with handing_app.app_context():
        (reply,) = reply_rows()
        assert reply.status == MessageStatus.QUEUED and reply.twilio_sid == twilio.messages[0]["sid"]


def test_a_stopping_worker_hands_nothing_over(handing_app, post_webhook, twilio, monkeypatch):
    """Told to stop, the turn's reply takes the queue (the next worker sends it), not a thread
    that is about to die."""
    from bot.delivery import shutdown

    monkeypatch.setattr(shutdown.stopping, "is_set", lambda: True)
    with handing_app.app_context():
        make_contact()
    post_webhook(inbound_form(body="feedback"))
    task = huey.dequeue()
    with handing_app.app_context():
        huey.execute(task)
    assert [t.name.rsplit(".", 1)[-1] for t in huey.pending()] == ["send_message"]
