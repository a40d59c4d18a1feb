"""Events on bad days: concurrent commits, a dead receiver, a large backlog to prune, a replay in
the middle of an attempt (docs/reliability.md).

The receiver is tests/delivery/test_events.py's: a real HTTP server verifying every request with
`standardwebhooks`, as a backend would.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from huey import signals
from sqlalchemy.orm import Session

from bot import create_app
from bot.clock import utcnow
from bot.conversations.consent import change_consent
from bot.delivery import event_delivery
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Event
from tests.conftest import empty_tables, in_process_queue_options, make_contact
from tests.delivery.test_events import AUTH, SECRET, Receiver, events_app, receiver, retries_come_due, stored_events  # noqa: F401

on_postgresql = pytest.mark.skipif(
    not (__import__("os").environ.get("TEST_DATABASE_URL") or "").startswith("postgresql"),
    reason="concurrent writers: PostgreSQL only (SQLite has one writer at a time)")


def event_row(contact_id: int | None, *, pushed: bool) -> Event:
    """An event as `events.emit` writes it, for a session the test drives by hand."""
    now = utcnow()
    return Event(type="contact.opted_in", data={"contact": "test"}, contact_id=contact_id, created_at=now,
                 status="pending" if pushed else "stored", next_attempt_at=now if pushed else None, attempts=0)


def wait_until_final(app, budget: float = 60.0) -> None:
    """Every committed event is final: the machine's other transactions that began before them
    (other tests' databases share the cluster) have ended. Waits on that, not on a clock."""
    deadline = time.monotonic() + budget
    with app.app_context():
        while db.session.scalar(sa.select(sa.func.count()).select_from(Event).where(~event_delivery.is_final())):
            db.session.commit()
            assert time.monotonic() < deadline, "an older transaction stayed open"
            time.sleep(0.05)
        db.session.commit()


# --- the cursor and the push order are safe whatever order transactions commit in -----------------


@on_postgresql
def test_a_poller_never_skips_an_event_committed_after_a_later_one(app, client, auth):
    """Session A writes an event (the lower seq) and stays open; session B writes one and commits;
    the backend polls; A commits; polling from the cursor it was given returns A's event."""
    with app.app_context():
        contact = make_contact()
        connection = db.engine.connect()
        first = Session(bind=connection)
        try:
            slow = event_row(contact.id, pushed=False)
            first.add(slow)
            first.flush()  # seq and transaction id taken, not committed (a worker's long turn)
            fast = event_row(contact.id, pushed=False)
            db.session.add(fast)
            db.session.commit()  # a status callback in the web, committed first
            assert fast.seq > slow.seq
            fast_id, slow_id = fast.id, slow.id
            page = client.get("/events", headers=auth).get_json()
            first.commit()
        finally:
            first.close()
            connection.close()
    after = f"?after={page['next_after']}" if page["next_after"] else ""
    deadline = time.monotonic() + 30  # until every transaction older than A's has ended (milliseconds, usually)
    while True:
        rest = client.get(f"/events{after}", headers=auth).get_json()
        seen = [e["id"] for e in page["events"]] + [e["id"] for e in rest["events"]]
        if len(seen) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(seen) == sorted([fast_id, slow_id]) and len(seen) == 2  # nothing skipped, nothing twice
    everything = [e["id"] for e in client.get("/events", headers=auth).get_json()["events"]]
    assert everything == seen  # one order for every poller, whenever it polls


@on_postgresql
def test_a_contacts_events_are_pushed_in_the_order_the_poller_sees_them(events_app, receiver):
    """The push uses the same order: B's event (committed first, written second) is not pushed
    while A's is still open, and once A commits the receiver gets A's then B's."""
    with events_app.app_context():
        contact = make_contact()
        connection = db.engine.connect()
        first = Session(bind=connection)
        try:
            slow = event_row(contact.id, pushed=True)
            first.add(slow)
            first.flush()
            fast = event_row(contact.id, pushed=True)
            db.session.add(fast)
            db.session.commit()
            fast_id, slow_id = fast.id, slow.id
            event_delivery.deliver(fast_id)  # its task, run at once
            assert receiver.verified == []
            first.commit()
        finally:
            first.close()
            connection.close()
    wait_until_final(events_app)
    with events_app.app_context():
        event_delivery.deliver(slow_id)
    assert [e["id"] for e in receiver.delivered()] == [slow_id, fast_id]
    polled = events_app.test_client().get("/events", headers=AUTH).get_json()["events"]
    assert [e["id"] for e in polled] == [slow_id, fast_id]


# --- a dead receiver costs about one task per attempt ---------------------------------------------


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def queue_length() -> int:
    return huey.pending_count() + huey.scheduled_count()


def consume_for(seconds: float) -> int:
    """What one consumer does for `seconds` of real time: run each task when it is due (scheduled
    ones at their eta, as huey's scheduler would). Returns how many task executions it made
    (huey's own count: a task taken off the queue before its eta goes back, unexecuted)."""
    executions: list[str] = []

    @huey.signal(signals.SIGNAL_EXECUTING)
    def count(signal, task, *args):
        executions.append(task.id)

    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for due in huey.read_schedule(utcnow()):
                huey.enqueue(due)
            task = huey.dequeue()
            if task is None:
                time.sleep(0.02)
                continue
            huey.execute(task)
    finally:
        huey.disconnect_signal(count, signals.SIGNAL_EXECUTING)
    return len(executions)


@pytest.fixture
def dead_receiver_app(base_config, _schema, twilio) -> Iterator[Any]:
    """The app pushing to a port nothing listens on, with the real HOLD_BACK."""
    app = create_app({**base_config, "TESTING": True, "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config),
                      "EVENTS_WEBHOOK_URL": f"http://127.0.0.1:{closed_port()}/events",
                      "EVENTS_WEBHOOK_SECRET": SECRET})
    with app.app_context():
        empty_tables()
    huey.flush()
    event_delivery._receiver_down_until = 0.0
    yield app
    event_delivery._receiver_down_until = 0.0
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    huey.flush()


def test_a_dead_receiver_costs_one_task_per_attempt_and_the_sweep_adds_at_most_its_concurrency(
        dead_receiver_app, record_property):
    """40 contacts opt in (40 events) while the receiver is down; a consumer runs for 6 s. Each
    event's own task runs once; after that a task runs only for an attempt it makes (no task
    re-enqueues itself while the receiver is held back); the sweep a minute later adds at most
    EVENTS_CONCURRENCY tasks, not one per waiting event."""
    app = dead_receiver_app
    with app.app_context():
        for i in range(40):
            change_consent(make_contact(f"+1555800{i:04d}", consent="unknown"), "opted_in", source="api")
            db.session.commit()
    queued = queue_length()
    executions = consume_for(6.0)
    stored = stored_events(app)
    attempts = sum(e.attempts for e in stored)
    tried = sum(1 for e in stored if e.attempts)
    waiting = queue_length()
    with app.app_context():  # a minute and more later (the tried one's retry still 5 minutes away)
        db.session.execute(sa.update(Event).where(Event.attempts == 0)
                           .values(next_attempt_at=utcnow() - timedelta(minutes=2)))
        db.session.commit()
        swept = event_delivery.sweep()
    after_sweep = queue_length()
    figures = {"events": len(stored), "queued_at_start": queued, "task_executions_in_6s": executions,
               "events_tried": tried, "attempts": attempts, "queue_before_sweep": waiting,
               "queue_after_sweep": after_sweep, "sweep_enqueued": swept}
    record_property("dead_receiver", figures)
    print("dead receiver:", figures)
    assert queued == 40 and 1 <= attempts
    assert executions <= queued + attempts  # its own task once per event, then one per attempt
    assert waiting <= attempts  # only the scheduled retries of the events tried
    concurrency = int(app.config["EVENTS_CONCURRENCY"])
    assert swept <= concurrency and after_sweep - waiting <= concurrency
    with app.app_context():
        assert event_delivery.sweep() <= concurrency  # a minute later: the next ones, not the same again
    queued_ids = [task.args[0] for task in huey.pending() + huey.scheduled()]
    assert len(queued_ids) == len(set(queued_ids))  # never two tasks for one event


def test_a_backlog_is_delivered_by_the_slot_holder_once_the_receiver_answers(events_app, receiver):
    """Tasks that ended (slots taken) leave their events to whoever holds a slot: one task
    delivers every due event, in order, and nothing stays behind."""
    with events_app.app_context():
        for i in range(5):
            change_consent(make_contact(f"+1555700{i:04d}", consent="unknown"), "opted_in", source="api")
            db.session.commit()
        huey.flush()  # their own tasks are lost: the one below must do it all
        [first, *_] = [e.id for e in db.session.scalars(sa.select(Event).order_by(*event_delivery.in_order()))]
        assert event_delivery.deliver(first) == event_delivery.Outcome.DELIVERED
    assert len(receiver.delivered()) == 5
    assert [e.id for e in stored_events(events_app)] == [e["id"] for e in receiver.delivered()]


# --- pruning goes on until nothing is past retention ----------------------------------------------


def old_events(count: int, status: str = "delivered") -> None:
    created = utcnow() - timedelta(days=31)
    db.session.execute(sa.insert(Event), [
        {"type": "contact.opted_in", "data": {}, "contact_id": None, "created_at": created, "status": status,
         "attempts": 1} for _ in range(count)])
    db.session.commit()


def count_events(status: str | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(Event)
    if status:
        query = query.where(Event.status == status)
    return db.session.scalar(query)


def test_prune_deletes_more_than_one_batch_in_one_run(app):
    """6,000 delivered events past retention (more than one batch of 5,000): one run deletes them
    all; failed ones and recent ones stay."""
    with app.app_context():
        old_events(6000)
        old_events(3, status="failed")
        change_consent(make_contact(consent="unknown"), "opted_in", source="api")
        db.session.commit()
        assert event_delivery.prune() == 6000
        assert count_events("delivered") == 0 and count_events("failed") == 3 and count_events() == 4


def test_prune_works_in_bounded_batches_within_a_time_budget(app):
    with app.app_context():
        old_events(250)
        assert event_delivery.prune(batch=100, budget=timedelta(0)) == 100  # budget spent after one batch
        assert event_delivery.prune(batch=100) == 150  # the next run goes on until none is left
        assert count_events() == 0


# --- a replay never disturbs an attempt on the wire -----------------------------------------------


class HeldReceiver(Receiver):
    """A receiver that keeps each request waiting until the test lets it answer."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()
        self.release = threading.Event()

    def _app(self, environ, start_response):
        self.arrived.set()
        self.release.wait(60)
        return super()._app(environ, start_response)


def test_replaying_an_event_mid_attempt_is_refused_and_the_attempt_keeps_its_schedule(base_config, _schema, twilio):
    with HeldReceiver() as held:
        app = create_app({**base_config, "TESTING": True, "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config),
                          "EVENTS_WEBHOOK_URL": held.url, "EVENTS_WEBHOOK_SECRET": SECRET})
        try:
            with app.app_context():
                empty_tables()
                change_consent(make_contact(consent="unknown"), "opted_in", source="api")
                db.session.commit()
                [event_id] = db.session.scalars(sa.select(Event.id)).all()
            huey.flush()
            event_delivery._receiver_down_until = 0.0
            held.answers = [500]
            outcomes: list[str] = []

            def attempt() -> None:
                with app.app_context():
                    outcomes.append(event_delivery.deliver(event_id))

            on_the_wire = threading.Thread(target=attempt)
            on_the_wire.start()
            assert held.arrived.wait(60)
            replay = app.test_client().post(f"/events/{event_id}/retry", headers=AUTH)
            held.release.set()
            on_the_wire.join(60)
            [event] = stored_events(app)
        finally:
            held.release.set()
            event_delivery._receiver_down_until = 0.0
            with app.app_context():
                db.session.remove()
                db.engine.dispose()
            huey.flush()
    assert replay.status_code == 409 and "being delivered" in replay.get_json()["error"]
    assert outcomes == [event_delivery.Outcome.RETRY]
    assert (event.status, event.attempts, event.last_error) == ("pending", 1, "HTTP 500")
    assert event.next_attempt_at <= utcnow() + event_delivery.SCHEDULE[0]  # 5 s, not the 10 h of a last attempt


def test_an_attempt_settles_only_the_claim_it_made(events_app, receiver):
    """An attempt whose lease ran out and was taken over (or whose event was replayed) records
    nothing when it finally fails: the new claim's attempt decides."""
    with events_app.app_context():
        change_consent(make_contact(consent="unknown"), "opted_in", source="api")
        db.session.commit()
        [event_id] = db.session.scalars(sa.select(Event.id)).all()
        huey.flush()
        first = event_delivery.claim(event_id)
        db.session.execute(sa.update(Event).values(claimed_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        second = event_delivery.claim(event_id)
        assert first is not None and second is not None and first.token != second.token
        assert event_delivery._failed(first, "ReadTimeout") == event_delivery.Outcome.RETRY
        row = db.session.scalar(sa.select(Event))
        assert (row.status, row.claim_token, row.attempts, row.last_error) == ("delivering", second.token, 2, None)
        assert event_delivery._settle(second, "delivered", None) == event_delivery.Outcome.DELIVERED
        db.session.expire_all()
        assert db.session.scalar(sa.select(Event.status)) == "delivered"
        assert huey.pending_count() + huey.scheduled_count() == 0  # no retry scheduled by the stale attempt
