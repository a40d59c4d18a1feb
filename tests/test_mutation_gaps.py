"""Tests that bench/mutation.py showed missing: each kills a mutant that every other test let
live (bench/MUTATION.md names them)."""
from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Contact, Message, StatusEvent
from bot.twilio.whatsapp import SESSION_WINDOW, within_window
from bot.vocabulary import Consent, Kind, MessageStatus
from bot.devtools.simulator import sign
from tests.conftest import AUTH_TOKEN, inbound_form, make_contact, run_queue, status_form
from tests.test_webhook import sent_message, stored

PHONE = "+15551234567"


def test_the_window_closes_at_exactly_24_hours():
    """Mutant window-boundary: WhatsApp's window is 24 hours; at 24 hours it is closed."""
    now = datetime(2026, 12, 5, 12, 0, 0)
    assert within_window(now - SESSION_WINDOW + timedelta(microseconds=1), now=now)
    assert not within_window(now - SESSION_WINDOW, now=now)


def test_a_status_of_the_same_rank_does_not_replace_the_one_stored(app, client, auth, post_webhook):
    """Mutant rank-equal-moves: `delivered` and `undelivered` rank the same (final); the first
    final status a callback brings stays (invariant 3), the later callback is kept as an event."""
    message_id, sid = sent_message(app, client, auth)
    assert post_webhook(status_form(sid, "delivered")).status_code == 200
    assert post_webhook(status_form(sid, "undelivered", error_code=30003)).status_code == 200
    assert stored(app, message_id).status == MessageStatus.DELIVERED
    with app.app_context():
        assert sorted(db.session.scalars(sa.select(StatusEvent.status))) == ["delivered", "undelivered"]


def test_the_configured_webhook_url_is_the_one_verified(client):
    """Mutant signature-configured-url-ignored: behind a proxy the app is reached at an internal
    address; Twilio signed the public TWILIO_WEBHOOK_URL, and only a signature over it passes."""
    form = inbound_form(PHONE, "hello")
    internal = "http://10.0.0.5:8000"
    public_signature = sign(AUTH_TOKEN, "https://bot.example.test/twilio/webhook", form)
    response = client.post("/twilio/webhook", data=form, base_url=internal,
                           headers={"X-Twilio-Signature": public_signature})
    assert response.status_code == 200
    internal_signature = sign(AUTH_TOKEN, internal + "/twilio/webhook", inbound_form(PHONE, "again"))
    response = client.post("/twilio/webhook", data=inbound_form(PHONE, "again"), base_url=internal,
                           headers={"X-Twilio-Signature": internal_signature})
    assert response.status_code == 403


def test_an_opt_out_confirmation_does_not_wait_behind_a_message_in_flight(app, client, auth, post_webhook, twilio):
    """Mutant claim-confirmation-waits: an older notification is held by a stalled worker (its
    lease still running) when the contact sends STOP; the confirmation goes at once (invariant 9's
    one exception), and nothing else does."""
    with app.app_context():
        make_contact(PHONE)
    promo = client.post("/notify", json={"to": PHONE, "body": "promo"}, headers=auth).get_json()["id"]
    huey.flush()
    with app.app_context():
        db.session.execute(sa.update(Message).where(Message.id == promo).values(
            status=MessageStatus.DISPATCHING, status_rank=MessageStatus.DISPATCHING.rank,
            claimed_until=utcnow() + timedelta(minutes=5), attempts=1))
        db.session.commit()
    assert post_webhook(inbound_form(PHONE, "STOP")).status_code == 200
    run_queue()
    with app.app_context():
        confirmation = db.session.scalar(sa.select(Message).where(Message.kind == Kind.OPT_OUT_CONFIRMATION))
        assert confirmation is not None and confirmation.twilio_sid is not None
        assert db.session.get(Message, promo).status == MessageStatus.DISPATCHING  # still held
    assert [m["body"] for m in twilio.messages] == [confirmation.body]
    with app.app_context():
        assert db.session.scalar(sa.select(Contact.consent).where(Contact.phone == PHONE)) == Consent.OPTED_OUT
