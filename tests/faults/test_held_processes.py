"""A scheduled message through real processes survives a worker SIGKILL and a Redis flush, and
leaves within seconds of its time (invariant 15): the queue's copy is only a hint, the database
holds the message and the worker's release check finds it (docs/delivery.md, "Held messages")."""
from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest
import redis
import requests

from bot.clock import isoformat, utcnow
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Conversation, Message
from bot.vocabulary import ConversationStatus, MessageStatus
from tests.faults.test_processes import running_stack, wait_until
from tests.faults.test_worker_faults import AUTH, add_contacts, posts

#: How far ahead the message is scheduled: time to kill the worker, flush and start a new one.
AHEAD = timedelta(seconds=20)
#: "Within seconds": the release check runs every 2 s on each consumer.
LATENESS_LIMIT = 6.0


def flush_the_queue(base_config) -> None:
    """What an operator's FLUSHDB (or a Redis that lost its data) does: every key gone."""
    if base_config.get("REDIS_URL"):
        redis.Redis.from_url(base_config["REDIS_URL"]).flushdb()
    else:
        huey.flush()  # the embedded queue: the same loss


def kill_the_worker_and_lose_the_queue(stack, app, base_config) -> None:
    """SIGKILL the worker once it holds both scheduled hints, flush Redis, start a new worker: all
    that is left of the two sends is in the database."""
    with app.app_context():
        # The queue's hints, about to be lost: in the worker's schedule once it dequeued them
        # (a loaded machine's worker takes a moment).
        wait_until(lambda: huey.scheduled_count() == 2, timeout=10, what="the worker to schedule both hints")
    stack["stop_worker"](signal.SIGKILL)
    flush_the_queue(base_config)
    with app.app_context():
        assert huey.scheduled_count() == 0 and huey.pending_count() == 0
    stack["start_worker"]()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_scheduled_message_survives_sigkill_and_a_redis_flush_and_leaves_on_time(
        base_config, _schema, app, tmp_path, record_property):
    on_time, canceled = add_contacts(app, 2)
    with running_stack(base_config, tmp_path) as stack:
        simulator, base = stack["simulator"], stack["base"]
        send_at = (utcnow() + AHEAD).replace(microsecond=0)
        when = send_at.isoformat() + "Z"
        kept = requests.post(base + "/notify", json={"to": on_time, "body": "on time", "send_at": when},
                             headers=AUTH, timeout=5)
        dropped = requests.post(base + "/notify", json={"to": canceled, "body": "never", "send_at": when},
                                headers=AUTH, timeout=5)
        assert kept.status_code == dropped.status_code == 202, (kept.text, dropped.text)
        assert kept.json()["held_until"] == isoformat(send_at)
        cancel = requests.post(base + f"/messages/{dropped.json()['id']}/cancel", headers=AUTH, timeout=5)
        assert cancel.status_code == 200 and cancel.json()["status"] == "canceled"
        kill_the_worker_and_lose_the_queue(stack, app, base_config)

        wait_until(lambda: posts(simulator), timeout=AHEAD.total_seconds() + 30, what="the scheduled send")
        arrived = utcnow()
        lateness = (arrived - send_at).total_seconds()
        time.sleep(3)  # the canceled one, had it been released, would be on its way by now
        record_property("scheduled_after_sigkill_and_flush", {"lateness_seconds": round(lateness, 2)})
        print(f"\nscheduled send after SIGKILL + queue flush: reached Twilio {lateness:.2f} s after its send_at")
        assert lateness >= -0.2, "sent before its time"
        assert lateness < LATENESS_LIMIT, f"sent {lateness:.1f} s late"
        assert [m["body"] for m in simulator.messages] == ["on time"]
        with app.app_context():
            db.session.remove()
            assert db.session.get(Message, dropped.json()["id"]).status == MessageStatus.CANCELED
            assert db.session.get(Message, kept.json()["id"]).twilio_sid == simulator.messages[0]["sid"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_scheduled_flow_survives_sigkill_and_a_redis_flush_and_starts_on_time(
        base_config, _schema, app, tmp_path, record_property):
    """The same for a backend-started flow (docs/ARCHITECTURE.md, "Scheduled flows"): held as a
    `starting` conversation with `not_before`, started by the release within seconds of its
    time; one canceled meanwhile never starts."""
    on_time, canceled = add_contacts(app, 2)
    flow = {"flow": "appointment", "variables": {"name": "Ada", "date": "12/03", "time": "10:30"}}
    with running_stack(base_config, tmp_path) as stack:
        simulator, base = stack["simulator"], stack["base"]
        send_at = (utcnow() + AHEAD).replace(microsecond=0)
        when = send_at.isoformat() + "Z"
        kept = requests.post(base + "/notify", json={"to": on_time, **flow, "send_at": when, "quiet_hours": None},
                             headers=AUTH, timeout=5)
        dropped = requests.post(base + "/notify", json={"to": canceled, **flow, "send_at": when},
                                headers=AUTH, timeout=5)
        assert kept.status_code == dropped.status_code == 202, (kept.text, dropped.text)
        assert kept.json()["held_until"] == isoformat(send_at) and kept.json()["status"] == "starting"
        cancel = requests.post(base + f"/conversations/{dropped.json()['id']}/cancel", headers=AUTH, timeout=5)
        assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
        kill_the_worker_and_lose_the_queue(stack, app, base_config)

        wait_until(lambda: posts(simulator), timeout=AHEAD.total_seconds() + 30, what="the flow's first message")
        lateness = (utcnow() - send_at).total_seconds()
        time.sleep(3)  # the canceled one, had it started, would have written by now
        record_property("scheduled_flow_after_sigkill_and_flush", {"lateness_seconds": round(lateness, 2)})
        assert lateness >= -0.2, "started before its time"
        assert lateness < LATENESS_LIMIT, f"started {lateness:.1f} s late"
        assert [m["to"] for m in simulator.messages] == [f"whatsapp:{on_time}"]
        with app.app_context():
            db.session.remove()
            assert db.session.get(Conversation, dropped.json()["id"]).status == ConversationStatus.CANCELLED
            assert db.session.get(Conversation, kept.json()["id"]).status == ConversationStatus.ACTIVE
