"""A small day of traffic for the dashboard's tests and screenshots, made through the real
paths: signed inbound webhooks, POST /notify, the queue run in this process (sends through the
real SDK to the simulator), signed status callbacks, the handoff keyword."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import Flask

from bot.devtools.simulator import TwilioSimulator, sign
from bot.extensions import db
from bot.models import Contact, Event, Message
from bot.vocabulary import EventStatus, MessageStatus
from tests.conftest import API_TOKEN, AUTH_TOKEN, PUBLIC_BASE, WEBHOOK_URL, inbound_form, run_queue, status_form

ADA = "+15551234567"
GRACE = "+15557654321"
MALLORY = "+15550001111"
#: Markup an attacker controls: a profile name and a message body.
XSS_NAME = '<script>alert("name")</script>'
XSS_BODY = '<img src=x onerror=alert("body")>'


@dataclass
class Day:
    """What the scenario made: ids to look for on the pages."""

    failed_id: str  # a notification Twilio failed with 63016
    failed_event_id: str  # its message.status event, given up on (failed)
    delivered_id: str
    handoff_contact_id: int  # Grace, who asked for a person
    xss_id: str  # Mallory's message


def _webhook(app: Flask, form: dict[str, str]) -> None:
    response = app.test_client().post("/twilio/webhook", data=form, base_url=PUBLIC_BASE,
                                      headers={"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)})
    assert response.status_code == 200, response.get_data(as_text=True)


def _notify(app: Flask, **payload: Any) -> str:
    response = app.test_client().post("/notify", json=payload, headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def _sid(app: Flask, message_id: str) -> str:
    with app.app_context():
        sid = db.session.scalar(sa.select(Message.twilio_sid).where(Message.id == message_id))
    assert sid, "the message was not sent to the simulator"
    return sid


def make_day(app: Flask, twilio: TwilioSimulator) -> Day:
    """Write the day; returns what the pages should show."""
    _webhook(app, inbound_form(ADA, "hi there"))
    _webhook(app, inbound_form(GRACE, "hello", ProfileName="Grace"))
    _webhook(app, inbound_form(MALLORY, XSS_BODY, ProfileName=XSS_NAME))
    run_queue()
    failed_id = _notify(app, to=ADA, body="Your order #17 shipped")
    delivered_id = _notify(app, to=GRACE, body="Your invoice is ready")
    run_queue()
    failed_sid, delivered_sid = _sid(app, failed_id), _sid(app, delivered_id)
    _webhook(app, status_form(failed_sid, "sent", to=ADA))
    _webhook(app, status_form(failed_sid, "failed", error_code=63016, to=ADA))
    for status in ("sent", "delivered"):
        _webhook(app, status_form(delivered_sid, status, to=GRACE))
    _webhook(app, inbound_form(GRACE, "agent", ProfileName="Grace"))
    run_queue()
    _webhook(app, inbound_form(GRACE, "My bill is wrong, can someone help?", ProfileName="Grace"))
    run_queue()
    with app.app_context():
        event = db.session.scalar(sa.select(Event).where(Event.message_id == failed_id,
                                                         Event.data["status"].as_string() == MessageStatus.FAILED.value))
        assert event is not None, "no message.status event for the failure"
        # As if the receiver had been down for the whole retry schedule (tests/delivery/test_events.py
        # walks the schedule itself): failed, replayable.
        event.status, event.attempts, event.last_error = EventStatus.FAILED, 8, "HTTP 503"
        event_id = event.id
        grace = db.session.scalar(sa.select(Contact).where(Contact.phone == GRACE))
        assert grace.handoff_until is not None, "the handoff keyword did not start a handoff"
        xss_id = db.session.scalar(sa.select(Message.id).where(Message.body == XSS_BODY))
        db.session.commit()
        return Day(failed_id=failed_id, failed_event_id=event_id, delivered_id=delivered_id,
                   handoff_contact_id=grace.id, xss_id=xss_id)
