"""A broadcast's work runs on the worker's bulk lane, never on the huey threads turns need, and
a reply never waits in line behind a broadcast's sends for a rate slot (invariant 16;
bot/delivery/bulk_lane.py; bench/THROUGHPUT.md, "Broadcasts", fifth run)."""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Iterator

import pytest
from flask import Flask

from bot import create_app
from bot.clock import utcnow
from bot.delivery import bulk_lane, shutdown
from bot.delivery.queue import huey
from bot.delivery.rate_limit import send_rate_limit
from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from tests.broadcasts.test_broadcasts_api import TEMPLATE, _users
from tests.conftest import API_TOKEN, SENDER, in_process_queue_options

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
LANE_THREADS = 2


@pytest.fixture
def lane_app(app: Flask, base_config: dict) -> Iterator[Flask]:
    """The test app's database and queue with the bulk lane on (the production default is 6
    threads), a sender of 10 a second and a broadcast share of half of it."""
    laned = create_app({**base_config, "TESTING": True, "BULK_LANE_THREADS": LANE_THREADS,
                        "TWILIO_MESSAGES_PER_SECOND": 10, "BROADCAST_RATE_SHARE": 0.5,
                        "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    yield laned
    deadline = time.monotonic() + 30
    while (bulk_lane.lane.running() or bulk_lane.lane.waiting() or bulk_lane.lane.started()) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    with laned.app_context():
        db.session.remove()
        db.engine.dispose()


class Peak(threading.Thread):
    """The most pieces of work the lane's threads ran at once, and the most pump turns on
    threads of their own, sampled every few milliseconds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.turns, self.done = 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.003):
            self.peak = max(self.peak, bulk_lane.lane.running())
            self.turns = max(self.turns, bulk_lane.lane.started())


def test_a_broadcasts_sends_and_pump_never_hold_a_huey_thread(lane_app: Flask, twilio: TwilioSimulator) -> None:
    """Twelve sends at five a second take two seconds or more; each of the broadcast's tasks
    (its pump turns, its send batches) gives its huey thread back at once, the lane runs at most
    BULK_LANE_THREADS batches at a time and the pump one turn at a time (on a thread of its own),
    and every recipient gets one message at the share's pace."""
    client = lane_app.test_client()
    ids = _users(client, AUTH, 12)
    assert client.post("/broadcasts", json={"audience": {"user_ids": ids}, **TEMPLATE},
                       headers=AUTH).status_code == 202
    peak = Peak()
    peak.start()
    held: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(twilio.timings) < 12 and time.monotonic() < deadline:
        # The test is the consumer: one huey thread, run by hand (scheduled tasks are due now).
        task = huey.dequeue()
        if task is None:
            for scheduled in huey.read_schedule(utcnow() + timedelta(days=1)):
                scheduled.eta = None
                huey.enqueue(scheduled)
            time.sleep(0.01)
            continue
        started = time.monotonic()
        huey.execute(task)
        name = task.name.rsplit(".", 1)[-1]
        held[name] = max(held.get(name, 0.0), time.monotonic() - started)
    peak.done.set()
    peak.join()
    arrivals = sorted(t["received_at"] for t in twilio.timings)
    assert sorted(m["to"] for m in twilio.messages) == sorted(f"whatsapp:+1555200{n:04d}" for n in range(12))
    assert arrivals[-1] - arrivals[0] >= 1.9  # twelve at five a second: the share holds on the lane
    for i in range(len(arrivals) - 5):
        assert arrivals[i + 5] - arrivals[i] >= 0.8, f"broadcast sends {i}..{i + 5} within a second"
    # The batches waited seconds for their slots, on the lane: no task held its thread for that.
    assert {"send_message", "pump_broadcast"} <= set(held)
    assert max(held.values()) < 0.5, held
    assert 1 <= peak.peak <= LANE_THREADS
    assert 1 <= peak.turns <= 2  # a turn's thread may still be ending as the next one starts


def test_a_stopping_worker_gives_back_the_lanes_work_not_started_and_waits_for_the_rest(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    """Told to stop, the lane's waiting work goes back to the queue untouched (the next worker
    does it) and its running work ends before the drain returns (bot/delivery/shutdown.py)."""
    monkeypatch.setattr(shutdown, "stopping", threading.Event())
    lane = bulk_lane.BulkLane()
    release, events = threading.Event(), []

    def running() -> None:
        release.wait(10)
        events.append("first ran")

    lane.take(bulk_lane.Work(app, "first", running, lambda: events.append("first given back")), threads=1)
    lane.take(bulk_lane.Work(app, "second", lambda: events.append("second ran"),
                             lambda: events.append("second given back")), threads=1)
    deadline = time.monotonic() + 5
    while lane.running() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (lane.running(), lane.waiting()) == (1, 1)
    shutdown.stopping.set()
    assert not lane.take(bulk_lane.Work(app, "late", lambda: None, lambda: None), threads=1)
    threading.Timer(0.3, release.set).start()
    began = time.monotonic()
    lane.drain(timeout=5)
    assert time.monotonic() - began >= 0.25  # it waited for the running work
    assert events == ["second given back", "first ran"]
    assert lane.running() == lane.waiting() == 0


def test_the_lane_off_or_full_leaves_the_work_to_the_caller(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    """BULK_LANE_THREADS=0 (the tests' default) or WAITING_MAX waiting: `take` declines, and the
    huey thread does the work itself, as before the lane."""
    monkeypatch.setattr(shutdown, "stopping", threading.Event())
    monkeypatch.setattr(bulk_lane, "WAITING_MAX", 1)
    lane = bulk_lane.BulkLane()
    gate = threading.Event()
    assert not lane.take(bulk_lane.Work(app, "off", lambda: None, lambda: None), threads=0)
    assert lane.take(bulk_lane.Work(app, "first", lambda: gate.wait(10), lambda: None), threads=1)
    deadline = time.monotonic() + 5
    while lane.running() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lane.take(bulk_lane.Work(app, "second", lambda: None, lambda: None), threads=1)
    assert not lane.take(bulk_lane.Work(app, "third", lambda: None, lambda: None), threads=1)
    gate.set()


def test_a_replys_rate_slot_never_waits_behind_a_broadcasts_sends(app: Flask) -> None:
    """Broadcast sends wait in their own line while only the reserve is free: a reply asking
    after them takes a slot at once (a line shared with them would have it wait its turn)."""
    app.config.update(TWILIO_MESSAGES_PER_SECOND=10)
    with app.app_context():
        limit = send_rate_limit()
        time.sleep(1.0)  # the window empties
        assert all(limit.acquire(SENDER, max_wait=0) for _ in range(5))  # 5 left: the reserve
        waiting = [threading.Thread(target=limit.acquire, args=(SENDER,), kwargs={"max_wait": 2, "keep_free": 5},
                                    daemon=True) for _ in range(3)]
        for thread in waiting:
            thread.start()
        line = limit._line(limit.item, SENDER, keep_free=5)
        deadline = time.monotonic() + 5
        while line.waiting() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert line.waiting() == 3  # the broadcast's sends stand in line
        began = time.monotonic()
        assert limit.acquire(SENDER, max_wait=0.5)
        assert time.monotonic() - began < 0.2
        for thread in waiting:
            thread.join(5)
