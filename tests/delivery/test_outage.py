"""Inbound survives a database outage (invariant 11), in process: on SQLite and PostgreSQL alike.

The database is made unreachable by refusing every new connection of the app's engine (as a
stopped server does) after dropping the pool's open ones; the queue is the real one. The same
fault against real gunicorn and huey_consumer processes, with a TCP proxy cut in front of
PostgreSQL, is in tests/faults/test_outage_processes.py.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from flask import Flask
from huey.storage import RedisStorage

from bot import create_app
from bot.clock import utcnow
from bot.delivery import webhook_fallback
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Contact, Message, StatusEvent
from bot.devtools.simulator import sign
from tests.conftest import AUTH_TOKEN, PUBLIC_BASE, WEBHOOK_URL, inbound_form, run_queue, status_form
from tests.tcp_proxy import TcpProxy
from tests.http.test_webhook import count, sent_message, stored


@contextmanager
def database_down(app: Flask) -> Iterator[None]:
    """The app's database refuses every connection until the block ends; open ones are dropped."""
    with app.app_context():
        engine = db.engine
    dbapi = engine.dialect.loaded_dbapi
    # The words each driver uses, so the errors are classified as a real outage's would be.
    words = "unable to open database file" if engine.dialect.name == "sqlite" else "connection refused"

    def refuse(*_args) -> None:
        raise dbapi.OperationalError(f"{words} (the test's database outage)")

    engine.dispose()
    sa.event.listen(engine, "do_connect", refuse)
    try:
        yield
    finally:
        sa.event.remove(engine, "do_connect", refuse)


@contextmanager
def queue_down() -> Iterator[None]:
    """The queue answers nothing: its storage is a Redis on a port where nothing listens."""
    saved = huey.storage
    huey.storage = RedisStorage(name=huey.name, url="redis://127.0.0.1:1/0")
    try:
        yield
    finally:
        huey.storage = saved


def queued_task_names() -> list[str]:
    return [task.name for task in huey.pending()]


def run_one_task() -> None:
    """What a consumer does with the next task (a scheduled retry stays scheduled)."""
    task = huey.dequeue()
    assert task is not None
    huey.execute(task)


def test_inbound_with_the_database_down_is_queued_acknowledged_and_stored_once_when_it_is_back(
        app, post_webhook, twilio):
    form = inbound_form("+15557770001", "hello")
    with database_down(app):
        first = post_webhook(form)
        repeat = post_webhook(form)  # Twilio retrying the same MessageSid
        assert queued_task_names() == ["store_webhook"] * 2
        run_one_task()  # the worker tries while the database is still down: retried later
        assert len(huey.scheduled()) == 1
    assert (first.status_code, repeat.status_code) == (200, 200)
    assert b"<Response/>" in first.data
    back_at = utcnow()

    run_queue()  # the database is back: the stores, then the turn they enqueue, then the reply
    with app.app_context():
        [message] = db.session.scalars(sa.select(Message).where(Message.direction == "inbound")).all()
        assert (message.twilio_sid, message.body, message.status) == (form["MessageSid"], "hello", "processed")
        contact = db.session.scalar(sa.select(Contact))
        assert contact.phone == "+15557770001"
        # Stored as of when the user wrote, not when the database came back: the 24-hour window
        # and the contact's order run from then.
        assert message.created_at < back_at and contact.last_inbound_at < back_at
    [reply] = twilio.messages
    assert reply["to"] == "whatsapp:+15557770001"  # the conversation went on: the bot answered


def test_status_callbacks_with_the_database_down_are_applied_once_it_is_back(app, client, auth, post_webhook):
    message_id, sid = sent_message(app, client, auth)
    with database_down(app):
        for status in ("delivered", "read", "delivered"):
            assert post_webhook(status_form(sid, status)).status_code == 200
        assert queued_task_names() == ["store_webhook"] * 3
    run_queue()
    assert stored(app, message_id).status == "read"
    with app.app_context():
        events = db.session.scalars(sa.select(StatusEvent.status).where(StatusEvent.twilio_sid == sid)).all()
    assert sorted(events) == ["delivered", "read"]


def test_a_callback_kept_but_not_applied_before_the_outage_is_applied_by_the_queued_copy(
        app, client, auth, post_webhook):
    """The web committed the event, then lost the database before applying it: the queued copy
    is a repeat of the event, and still moves the message."""
    message_id, sid = sent_message(app, client, auth)
    with app.app_context():
        db.session.add(StatusEvent(twilio_sid=sid, status="delivered", payload={}, message_id=message_id))
        db.session.commit()
    with database_down(app):
        assert post_webhook(status_form(sid, "delivered")).status_code == 200
    run_queue()
    assert stored(app, message_id).status == "delivered"
    with app.app_context():
        assert count(StatusEvent) == 1


def test_the_request_after_an_outage_stores_directly(app, post_webhook):
    with database_down(app):
        assert post_webhook(inbound_form("+15557770002")).status_code == 200
    huey.flush()
    assert post_webhook(inbound_form("+15557770003")).status_code == 200
    with app.app_context():
        assert count(Message) == 1  # stored by the request itself, not left for the queue
    assert queued_task_names() == ["process_inbound"]


def test_database_and_queue_both_down_is_a_503_with_retry_after(app, post_webhook):
    with database_down(app), queue_down():
        response = post_webhook(inbound_form("+15557770004"))
        callback = post_webhook(status_form("SM" + "1" * 32, "delivered"))
    assert (response.status_code, callback.status_code) == (503, 503)
    assert "unavailable" in response.get_json()["error"]
    assert response.headers["Retry-After"] == "5"
    with app.app_context():
        assert count(Message) == 0 and count(StatusEvent) == 0


def test_bad_input_is_still_a_400_with_the_database_down(app, post_webhook):
    form = inbound_form()
    form["From"] = "whatsapp:not-a-number"
    with database_down(app):
        response = post_webhook(form)
    assert response.status_code == 400 and "From" in response.get_json()["error"]
    assert huey.pending_count() == 0


def test_healthz_names_the_database_while_it_is_down_and_recovers(app, client):
    with database_down(app):
        response = client.get("/healthz")
        assert response.status_code == 503
        body = response.get_json()
        assert body["database"].startswith("unavailable") and body["queue"] == "ok"
    assert client.get("/healthz").status_code == 200


def _wrapped(kind: type[sa.exc.DBAPIError], orig: Exception) -> sa.exc.DBAPIError:
    return kind("SELECT 1", {}, orig)


def test_an_outage_is_told_apart_from_a_bug():
    import psycopg

    unavailable = webhook_fallback.database_unavailable
    assert unavailable(_wrapped(sa.exc.OperationalError, sqlite3.OperationalError("database is locked")))
    assert unavailable(_wrapped(sa.exc.OperationalError, psycopg.OperationalError("server closed the connection")))
    assert unavailable(_wrapped(sa.exc.InterfaceError, psycopg.InterfaceError("the connection is closed")))
    assert unavailable(sa.exc.TimeoutError("QueuePool limit reached"))
    assert not unavailable(_wrapped(sa.exc.OperationalError, sqlite3.OperationalError("no such table: messages")))
    assert not unavailable(_wrapped(sa.exc.IntegrityError, sqlite3.IntegrityError("UNIQUE constraint failed")))
    assert not unavailable(ValueError("not a database error"))


def test_queued_webhooks_are_retried_sooner_after_a_blip_than_in_a_long_outage():
    now = time.time()
    delays = [webhook_fallback.retry_delay(now - waited, now) for waited in (0, 10, 60, 3600)]
    assert delays == [2.0, 5.0, 30.0, 60.0]
    assert webhook_fallback.retry_delay(now - 4 * 24 * 3600, now) is None


# --- connection overrides on the webhook URL (README: making Twilio retry a 503) -------------

#: Up to 3 retries on a refused or slow connection or a 5xx, each within 15 s of the first try.
OVERRIDES = "#rc=3&rp=ct,rt,5xx&ct=2000&rt=4000&tt=15000"


@pytest.fixture
def app_with_overrides(app, base_config) -> Iterator[Flask]:
    """TWILIO_WEBHOOK_URL configured with Twilio's connection overrides in its fragment."""
    other = create_app({**base_config, "TESTING": True, "TWILIO_WEBHOOK_URL": WEBHOOK_URL + OVERRIDES})
    yield other
    with other.app_context():
        db.session.remove()
        db.engine.dispose()


def test_connection_overrides_are_not_part_of_the_signed_url(app_with_overrides):
    client = app_with_overrides.test_client()
    form = inbound_form("+15557770005")
    # What Twilio signs: the URL without the fragment (it never sends the fragment either).
    signed = {"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)}
    assert client.post("/twilio/webhook", data=form, headers=signed, base_url=PUBLIC_BASE).status_code == 200
    with_fragment = {"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL + OVERRIDES, form)}
    assert client.post("/twilio/webhook", data=form, headers=with_fragment,
                       base_url=PUBLIC_BASE).status_code == 403
    with app_with_overrides.app_context():
        assert count(Message) == 1


def test_the_status_callback_url_keeps_its_overrides(app_with_overrides, twilio):
    """Sends name the configured URL, overrides included, so Twilio retries callbacks too."""
    client = app_with_overrides.test_client()
    form = inbound_form("+15557770006")
    client.post("/twilio/webhook", data=form, base_url=PUBLIC_BASE,
                headers={"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)})
    run_queue()
    [reply] = twilio.messages
    assert reply["form"]["StatusCallback"] == WEBHOOK_URL + OVERRIDES


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL only: a connection attempt to a silent host (SQLite has no host)")
def test_a_database_host_that_went_silent_is_given_up_on_in_seconds(app, base_config):
    """No reset, no answer (a partition): the connection attempt times out instead of holding the
    webhook past Twilio's 15 s, and the webhook is queued."""
    with TcpProxy.for_url(base_config["DATABASE_URL"]) as proxy:
        silent_app = create_app({**base_config, "TESTING": True,
                                 "DATABASE_URL": proxy.url_through(base_config["DATABASE_URL"])})
        try:
            with silent_app.app_context():
                db.engine.dispose()
            proxy.go_silent()
            form = inbound_form("+15557770007")
            answers: list[int] = []
            client = silent_app.test_client()
            request = threading.Thread(target=lambda: answers.append(client.post(
                "/twilio/webhook", data=form, base_url=PUBLIC_BASE,
                headers={"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)}).status_code))
            request.start()
            request.join(timeout=60)  # a liveness bound, far above the 5 s connect timeout
            assert answers == [200]
            assert queued_task_names() == ["store_webhook"]
        finally:
            proxy.restore()
            with silent_app.app_context():
                db.session.remove()
                db.engine.dispose()
