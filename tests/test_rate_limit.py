"""One send rate per sender, shared by every worker (invariant 10)."""
from __future__ import annotations

import os
import time
import uuid

import pytest

from bot.delivery.queue import huey
from bot.delivery.rate_limit import SendRateLimit, send_rate_limit
from bot.delivery.tasks import send_message
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import MessageStatus
from tests.conftest import SENDER, make_contact

SENDER_KEY = "whatsapp:+15550001111"


def test_a_full_window_refuses_until_it_moves():
    limit = SendRateLimit(5, "memory://", namespace="test-" + uuid.uuid4().hex)
    assert all(limit.acquire(SENDER_KEY, max_wait=0) for _ in range(5))
    assert not limit.acquire(SENDER_KEY, max_wait=0)
    assert limit.acquire("whatsapp:+15550002222", max_wait=0)  # another sender has its own budget
    assert limit.acquire(SENDER_KEY, max_wait=2)  # the window moves on within a second


def test_slowing_down_spends_the_rest_of_the_second():
    limit = SendRateLimit(50, "memory://", namespace="test-" + uuid.uuid4().hex)
    assert limit.acquire(SENDER_KEY, max_wait=0)
    limit.slow_down(SENDER_KEY)
    assert not limit.acquire(SENDER_KEY, max_wait=0)


@pytest.mark.skipif(not os.environ.get("TEST_REDIS_URL"), reason="a budget shared between processes lives in Redis")
def test_two_workers_share_one_budget_through_redis():
    namespace = "test-" + uuid.uuid4().hex
    first = SendRateLimit(6, os.environ["TEST_REDIS_URL"], namespace=namespace)
    second = SendRateLimit(6, os.environ["TEST_REDIS_URL"], namespace=namespace)  # another process's
    assert all(first.acquire(SENDER_KEY, max_wait=0) for _ in range(3))
    assert all(second.acquire(SENDER_KEY, max_wait=0) for _ in range(3))
    assert not first.acquire(SENDER_KEY, max_wait=0) and not second.acquire(SENDER_KEY, max_wait=0)


def test_sends_never_exceed_the_rate(base_config, _schema, twilio, app):
    """Twelve sends at 5 a second: any six of them span at least a second (a moving window)."""
    from bot import create_app
    from tests.conftest import in_process_queue_options

    slow = create_app({**base_config, "TESTING": True, "TWILIO_MESSAGES_PER_SECOND": 5,
                       "QUEUE_NAME": base_config["QUEUE_NAME"] + "-rate",
                       "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    with slow.app_context():
        contact = make_contact()
        ids = []
        for i in range(12):
            row = Message(direction="outbound", contact_id=contact.id, body=f"m{i}",
                          status=MessageStatus.PENDING, status_rank=0)
            db.session.add(row)
            db.session.commit()
            ids.append(row.id)
        huey.flush()
        started, finished = [], []
        for message_id in ids:
            started.append(time.monotonic())
            send_message.call_local(message_id)
            finished.append(time.monotonic())
        db.session.expire_all()
        assert [db.session.get(Message, i).status for i in ids] == [MessageStatus.QUEUED] * 12
        # Each send takes its slot between its start and its end, so six slots within a second
        # would show as a sixth send finishing less than a second after the first began.
        for i in range(len(finished) - 5):
            assert finished[i + 5] - started[i] >= 1.0, f"sends {i}..{i + 5} left within a second"
        assert send_rate_limit().item.amount == 5
        db.session.remove()
        db.engine.dispose()
    assert len(twilio.messages) == 12 and {m["from"] for m in twilio.messages} == {SENDER}


def test_a_429_from_twilio_slows_every_sender_down(app, twilio):
    with app.app_context():
        contact = make_contact()
        row = Message(direction="outbound", contact_id=contact.id, body="hi", status=MessageStatus.PENDING,
                      status_rank=0)
        db.session.add(row)
        db.session.commit()
        twilio.fail_next(429, 20429, "Too Many Requests")
        send_message.call_local(row.id)
        db.session.expire_all()
        assert db.session.get(Message, row.id).status == MessageStatus.RETRYING
        # The rest of this second's budget is gone for every worker of this sender.
        assert not send_rate_limit().acquire(SENDER, max_wait=0)
