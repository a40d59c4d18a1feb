"""Fixtures, from small to large (flaskr style): settings -> app -> client -> signed webhooks.

The default run needs nothing installed: SQLite files under a temporary directory hold the data
and the queue. With TEST_DATABASE_URL / TEST_REDIS_URL set, the very same tests run against
PostgreSQL and Redis. Twilio is the project's simulator, served over HTTP on 127.0.0.1 and spoken
to by the real SDK.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import settings

from bot import create_app
from bot.clock import utcnow
from bot.extensions import db
from bot.models import Contact
from bot.delivery.queue import huey
from bot.devtools.sendgrid_simulator import public_key_text
from bot.devtools.simulator import TwilioSimulator, sign

ACCOUNT_SID = "AC" + "a1" * 16
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
API_TOKEN = "test-api-token"
SENDER = "whatsapp:+14155238886"
PUBLIC_BASE = "https://bot.example.test"
WEBHOOK_URL = PUBLIC_BASE + "/twilio/webhook"
CONTENT_SIDS = {"order_update": "HX" + "b2" * 16}
EMAIL_FROM = "The Bot <bot@example.test>"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("instance"))


@pytest.fixture(scope="session")
def database_url(data_dir: str) -> str:
    return os.environ.get("TEST_DATABASE_URL") or "sqlite:///" + os.path.join(data_dir, "test.db")


@pytest.fixture(scope="session")
def redis_url() -> str | None:
    return os.environ.get("TEST_REDIS_URL") or None


@pytest.fixture(scope="session")
def queue_name() -> str:
    # Unique per run, so tests never consume (or flush) a running development server's queue.
    return "test-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def twilio() -> Iterator[TwilioSimulator]:
    """The Twilio simulator on 127.0.0.1, for the whole session."""
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN) as simulator:
        yield simulator


@pytest.fixture(scope="session")
def base_config(data_dir: str, database_url: str, redis_url: str | None, queue_name: str,
                twilio: TwilioSimulator) -> dict[str, Any]:
    """Settings shared by the in-process app and any consumer subprocess."""
    return {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_WHATSAPP_NUMBER": SENDER,
        "TWILIO_WEBHOOK_URL": WEBHOOK_URL,
        "TWILIO_API_URL": twilio.url,
        "TWILIO_TIMEOUT": 2,
        "TWILIO_CONTENT_SIDS": CONTENT_SIDS,
        "NOTIFY_API_TOKEN": API_TOKEN,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        # Email through the same simulator's SendGrid side (bot/devtools/sendgrid_simulator.py).
        "SENDGRID_API_KEY": twilio.sendgrid.api_key,
        "SENDGRID_API_URL": twilio.url,
        "EMAIL_FROM": EMAIL_FROM,
        "SENDGRID_WEBHOOK_PUBLIC_KEY": public_key_text(twilio.sendgrid.private_key),
        "SECRET_KEY": "test-secret-key-for-unsubscribe-links",
        "INSTANCE_PATH": data_dir,
        "QUEUE_NAME": queue_name,
        # The tests drive the queue by hand (run_queue): a reply sent from a hand-over thread
        # would race them, and so would a broadcast's work on the bulk lane.
        # tests/conversations/test_hand_over.py and tests/broadcasts/test_bulk_lane.py turn them on.
        "HAND_OVER_REPLIES": False,
        "BULK_LANE_THREADS": 0,
        # One queue, the one run_queue drains; tests/faults/test_bulk_process.py turns it on.
        "BULK_WORKER_PROCESS": False,
    }


@pytest.fixture(scope="session")
def _schema(base_config: dict[str, Any]) -> None:
    """Build the schema once per run with the real migrations (what `release:` runs)."""
    from flask_migrate import upgrade

    app = create_app({**base_config, "TESTING": True})
    with app.app_context():
        drop_everything()
        upgrade()


def drop_everything() -> None:
    """Drop every table, including alembic_version, so migrations start from nothing."""
    metadata = sa.MetaData()
    metadata.reflect(bind=db.engine)
    metadata.drop_all(bind=db.engine)
    db.session.commit()


@pytest.fixture
def app(base_config: dict[str, Any], _schema: None, twilio: TwilioSimulator) -> Iterator[Flask]:
    app = create_app({**base_config, "TESTING": True, "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    with app.app_context():
        empty_tables()
    huey.flush()
    twilio.reset()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()  # one pool per app: close it, or PostgreSQL runs out of connections
    huey.flush()


def in_process_queue_options(config: dict[str, Any]) -> dict[str, Any]:
    """Redis's blocking pop waits a second on an empty queue; tests drain it without waiting."""
    return {"blocking": False} if config.get("REDIS_URL") else {}


def empty_tables() -> None:
    """Delete every row, children first: each test starts from empty tables."""
    for table in reversed(db.metadata.sorted_tables):
        db.session.execute(table.delete())
    db.session.commit()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def signed_headers(url: str, form: dict[str, Any]) -> dict[str, str]:
    return {"X-Twilio-Signature": sign(AUTH_TOKEN, url, form)}


@pytest.fixture
def post_webhook(client: FlaskClient):
    """POST a form to /twilio/webhook signed as Twilio signs it (over the public URL)."""

    def post(form: dict[str, Any], *, signature: str | None = None, url: str = WEBHOOK_URL):
        headers = {"X-Twilio-Signature": signature if signature is not None else sign(AUTH_TOKEN, url, form)}
        return client.post("/twilio/webhook", data=form, headers=headers, base_url=PUBLIC_BASE)

    return post


def run_queue(include_scheduled: bool = True, max_tasks: int = 200) -> int:
    """Run queued tasks in this process until the queue is empty (what a consumer would do).

    With include_scheduled, delayed retries are run now instead of after their backoff.
    Returns the number of tasks executed.
    """
    executed = 0
    while executed < max_tasks:
        task = huey.dequeue()
        if task is None and include_scheduled:
            due = huey.read_schedule(utcnow() + timedelta(days=1))
            for scheduled in due:
                scheduled.eta = None  # due now: skip the backoff
                huey.enqueue(scheduled)
            if due:
                continue
        if task is None:
            return executed
        huey.execute(task)
        executed += 1
    raise AssertionError(f"queue still busy after {max_tasks} tasks")


def make_contact(phone: str = "+15551234567", *, inbound_ago: timedelta | None = timedelta(minutes=5),
                 consent: str = "opted_in") -> Contact:
    """A contact who wrote `inbound_ago` ago (None: never), inside the current app context."""
    contact = Contact(phone=phone, consent=consent,
                      last_inbound_at=None if inbound_ago is None else utcnow() - inbound_ago)
    db.session.add(contact)
    db.session.commit()
    return contact


def inbound_form(from_: str = "+15551234567", body: str = "hello", **extra: str) -> dict[str, str]:
    """An inbound WhatsApp message webhook as Twilio posts it."""
    sid = "SM" + uuid.uuid4().hex
    form = {
        "MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": ACCOUNT_SID,
        "From": "whatsapp:" + from_, "To": SENDER, "Body": body, "NumMedia": "0", "NumSegments": "1",
        "SmsStatus": "received", "ApiVersion": "2010-04-01", "WaId": from_.lstrip("+"),
        "ProfileName": "Ada", "MessageType": "text",
    }
    form.update(extra)
    return form


def status_form(sid: str, status: str, error_code: int | None = None, to: str = "+15551234567") -> dict[str, str]:
    """A WhatsApp status callback as Twilio posts it."""
    form = {
        "MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
        "AccountSid": ACCOUNT_SID, "From": SENDER, "To": "whatsapp:" + to, "ApiVersion": "2010-04-01",
        "ChannelPrefix": "whatsapp",
    }
    if error_code is not None:
        form["ErrorCode"] = str(error_code)
    return form


# Hypothesis profiles (tests/http/test_fuzz.py, tests/http/test_openapi.py): `thorough` is the default and
# what CI runs; HYPOTHESIS_PROFILE=quick bin/test for a fast local loop. No example database:
# CI starts from a fresh clone, and a failure prints the example and its reproduce blob.
settings.register_profile("thorough", max_examples=2500, deadline=None, database=None, print_blob=True)
settings.register_profile("quick", max_examples=100, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "thorough"))
