"""The pump's steps (bot/broadcasts/pump.py): the chain's liveness mark is written at its
heartbeat, not at every step, and stragglers are looked for only when a step is asked to, and
then sent. The chain is driven by hand, on the app's clock; sends go to the simulator over HTTP."""
from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from bot.broadcasts import pump
from bot.delivery.queue import huey
from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from bot.models import Broadcast, Message
from bot.vocabulary import MessageStatus
from tests.app_clock import AppClock, app_clock  # noqa: F401 - the fixture
from tests.broadcasts.test_broadcasts_api import TEMPLATE, _users
from tests.conftest import run_queue

NOON = datetime(2026, 6, 10, 12, 0)


def _broadcast_to(client: FlaskClient, auth: dict, count: int) -> str:
    accepted = client.post("/broadcasts", json={"audience": {"user_ids": _users(client, auth, count)}, **TEMPLATE},
                           headers=auth)
    assert accepted.status_code == 202, accepted.get_json()
    huey.flush()  # the chain is driven by hand below
    return accepted.get_json()["id"]


def _released(app: Flask, client: FlaskClient, auth: dict, app_clock: AppClock, count: int) -> tuple[str, str]:  # noqa: F811
    """At NOON, a broadcast to `count` users, stepped by hand until its messages are released:
    (its id, the chain's token)."""
    app_clock.set(NOON)
    broadcast_id = _broadcast_to(client, auth, count)
    token = None
    with app.app_context():
        while True:
            did, token, _ = pump._step(broadcast_id, token)
            if did != "expanding":
                return broadcast_id, token


def test_a_chain_marks_its_broadcast_at_its_heartbeat_not_at_every_step(
        app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator, app_clock: AppClock) -> None:  # noqa: F811
    broadcast_id, token = _released(app, client, auth, app_clock, 3)
    with app.app_context():
        marked = db.session.get(Broadcast, broadcast_id)
        assert (marked.pump_token, marked.pumped_at) == (token, NOON)
        app_clock.set(NOON + pump.HEARTBEAT - timedelta(seconds=1))
        assert pump._step(broadcast_id, token)[1] == token
        db.session.expire_all()
        assert db.session.get(Broadcast, broadcast_id).pumped_at == NOON  # not rewritten
        app_clock.set(NOON + pump.HEARTBEAT)
        assert pump._step(broadcast_id, token)[1] == token
        db.session.expire_all()
        assert db.session.get(Broadcast, broadcast_id).pumped_at == NOON + pump.HEARTBEAT
        # A chain whose mark is older than LOST_AFTER is lost: a new chain takes over with a new token.
        app_clock.set(NOON + pump.HEARTBEAT + pump.LOST_AFTER)
        assert pump._step(broadcast_id, None)[1] not in (None, token)


def test_stragglers_are_looked_for_when_a_step_is_asked_to_and_then_sent_once(
        app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator, app_clock: AppClock) -> None:  # noqa: F811
    broadcast_id, token = _released(app, client, auth, app_clock, 3)
    with app.app_context():
        released = db.session.scalar(sa.select(sa.func.count()).select_from(Message)
                                     .where(Message.broadcast_id == broadcast_id))
        assert released == 3
    huey.flush()  # their send tasks are lost: the three are stragglers once STRAGGLER_AFTER has passed
    app_clock.set(NOON + pump.STRAGGLER_AFTER + timedelta(seconds=1))
    with app.app_context():
        pump._step(broadcast_id, token, stragglers=False)
    assert run_queue(include_scheduled=False) == 0  # not looked for: nothing was enqueued
    with app.app_context():
        pump._step(broadcast_id, token, stragglers=True)
        kicked = db.session.scalars(sa.select(Message.next_attempt_at).where(Message.broadcast_id == broadcast_id))
        assert all(at is not None for at in kicked)
    run_queue(include_scheduled=False)
    assert sorted(m["to"] for m in twilio.messages) == [f"whatsapp:+1555200{n:04d}" for n in range(3)]
    with app.app_context():
        rows = db.session.execute(sa.select(Message.status, Message.twilio_sid)
                                  .where(Message.broadcast_id == broadcast_id)).all()
        assert {status for status, _ in rows} == {MessageStatus.QUEUED}  # accepted by Twilio, each once
        assert len({sid for _, sid in rows if sid}) == 3
