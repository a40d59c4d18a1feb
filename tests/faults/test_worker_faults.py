"""A worker's bad days through real processes: SIGTERM mid-send (every deploy) and SIGKILL mid-batch.

The Procfile's release, web and worker lines run as a host runs them; the simulator counts what
Twilio really received (docs/ARCHITECTURE.md, invariants 1 and 2; docs/reliability.md).
"""
from __future__ import annotations

import collections
import signal
import time
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import outbox
from bot.extensions import db
from bot.models import Contact, Message
from tests.conftest import API_TOKEN
from tests.faults.test_processes import running_stack, wait_until

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def add_contacts(app, count: int) -> list[str]:
    """`count` opted-in contacts who wrote five minutes ago (free-form messages may go)."""
    phones = [f"+1555{7000000 + i:07d}" for i in range(count)]
    with app.app_context():
        db.session.add_all([Contact(phone=phone, consent="opted_in", last_inbound_at=utcnow() - timedelta(minutes=5))
                            for phone in phones])
        db.session.commit()
    return phones


def unsent(app) -> int:
    with app.app_context():
        db.session.remove()
        return db.session.scalar(sa.select(sa.func.count()).select_from(Message).where(
            Message.direction == "outbound", Message.twilio_sid.is_(None)))


def posts(simulator) -> list[dict]:
    return [r for r in simulator.requests if r["method"] == "POST"]


@pytest.mark.timeout(180)
def test_sigterm_mid_send_finishes_the_send_and_sends_it_once(base_config, _schema, app, tmp_path):
    """A deploy's SIGTERM arrives while Twilio takes 4 s to answer: the worker waits for the
    answer, records the SID, and exits well inside the host's 30 s; nothing is sent again."""
    [phone] = add_contacts(app, 1)
    # The production timeout (the tests' 2 s would give up on the 4 s answer before the signal).
    with running_stack({**base_config, "TWILIO_TIMEOUT": 10}, tmp_path) as stack:
        simulator = stack["simulator"]
        simulator.hang_next(4)
        response = requests.post(stack["base"] + "/notify", json={"to": phone, "body": "deploy-proof"},
                                 headers=AUTH, timeout=5)
        assert response.status_code == 202, response.text
        message_id = response.json()["id"]
        wait_until(lambda: posts(simulator), what="the send to reach Twilio")
        began = time.monotonic()
        exit_code = stack["stop_worker"](signal.SIGTERM)
        took = time.monotonic() - began
        assert exit_code == 0
        assert took < 25, f"the worker took {took:.1f} s to stop"
        with app.app_context():
            db.session.remove()
            row = db.session.get(Message, message_id)
            assert row.twilio_sid == simulator.messages[0]["sid"], "the accepted send was not recorded"
            assert row.status in ("queued", "sent", "delivered", "read")
        # A new worker, and the sweep run as if every lease had long run out: nothing to resend.
        stack["start_worker"]()
        with app.app_context():
            db.session.remove()
            assert outbox.sweep(now=utcnow() + timedelta(hours=1))["outbound"] == 0
        time.sleep(2)
        assert len(posts(simulator)) == 1
        assert [m["body"] for m in simulator.messages] == ["deploy-proof"]
        assert "worker stopping" in stack["worker_log"]()


@pytest.mark.timeout(400)
def test_sigkill_mid_batch_loses_nothing_and_a_new_worker_sends_the_rest_within_two_minutes(
        base_config, _schema, app, tmp_path, record_property):
    """200 notifications; the worker is SIGKILLed while about a quarter have reached Twilio.
    A new consumer sends every remaining one within two minutes; those the dead worker had sent
    are found at Twilio (expired lease -> lookup), not sent again."""
    total = 200
    phones = add_contacts(app, total)
    # 300 ms per create: the kill lands with a batch on the wire.
    with running_stack(base_config, tmp_path, latency=0.3, auto_callbacks=False) as stack:
        simulator = stack["simulator"]
        stack["stop_worker"]()  # the backlog builds up first, so the kill lands mid-batch
        accepted = []
        for i, phone in enumerate(phones):
            response = requests.post(stack["base"] + "/notify", json={"to": phone, "body": f"batch {i}"},
                                     headers=AUTH, timeout=10)
            assert response.status_code == 202, response.text
            accepted.append(response.json()["id"])
        stack["start_worker"]()
        wait_until(lambda: len(posts(simulator)) >= total // 4, timeout=60, what="a quarter to reach Twilio")
        stack["stop_worker"](signal.SIGKILL)
        at_kill = len(posts(simulator))
        left = unsent(app)
        assert left > 0, "the kill came too late to test anything"
        restarted = time.monotonic()
        stack["start_worker"]()
        wait_until(lambda: unsent(app) == 0, timeout=120, what="every message to be sent after the restart")
        recovery = time.monotonic() - restarted
        time.sleep(1)
        bodies = collections.Counter(m["body"] for m in simulator.messages)
        duplicates = sum(count - 1 for count in bodies.values())
        lost = total - len(bodies)
        record_property("sigkill_batch", {"accepted": total, "sent": len(bodies), "duplicated": duplicates,
                                          "lost": lost, "posts_at_kill": at_kill, "unsent_at_kill": left,
                                          "recovery_seconds": round(recovery, 1)})
        print(f"SIGKILL mid-batch: accepted {total}, sent {len(bodies)}, duplicated {duplicates}, lost {lost}; "
              f"{at_kill} posted at the kill, {left} unrecorded; all sent {recovery:.0f} s after the restart")
        assert lost == 0
        assert duplicates == 0
        with app.app_context():
            db.session.remove()
            sids = db.session.scalars(sa.select(Message.twilio_sid).where(Message.id.in_(accepted))).all()
        assert sorted(sids) == sorted(m["sid"] for m in simulator.messages)
