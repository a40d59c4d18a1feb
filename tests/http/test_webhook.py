"""POST /twilio/webhook: signatures, inbound messages and status callbacks."""
from __future__ import annotations

import itertools
import random
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.extensions import db
from bot.models import Contact, Message, StatusEvent
from bot.delivery.queue import huey
from bot.vocabulary import RANK as STATUS_RANK
from tests.conftest import (AUTH_TOKEN, PUBLIC_BASE, WEBHOOK_URL, inbound_form, make_contact,
                            run_queue, status_form)
from bot.devtools.simulator import sign


def count(model) -> int:
    return db.session.scalar(sa.select(sa.func.count()).select_from(model))


# --- signatures (invariant 7) ---------------------------------------------------------------

def test_signed_inbound_is_accepted_with_empty_twiml(post_webhook):
    response = post_webhook(inbound_form())
    assert response.status_code == 200
    assert response.mimetype == "text/xml"
    assert b"<Response/>" in response.data


@pytest.mark.parametrize("tamper", ["no_signature", "garbage", "changed_body", "added_field", "other_url",
                                    "other_token", "dropped_field"])
def test_unverified_requests_are_refused(app, client, tamper):
    form = inbound_form(body="transfer $5")
    signature = sign(AUTH_TOKEN, WEBHOOK_URL, form)
    if tamper == "no_signature":
        signature = None
    elif tamper == "garbage":
        signature = "bm90IGEgc2lnbmF0dXJl"
    elif tamper == "changed_body":
        form["Body"] = "transfer $5000"
    elif tamper == "added_field":
        form["Extra"] = "1"
    elif tamper == "other_url":
        signature = sign(AUTH_TOKEN, "https://evil.example/twilio/webhook", form)
    elif tamper == "other_token":
        signature = sign("not-the-auth-token", WEBHOOK_URL, form)
    elif tamper == "dropped_field":
        form.pop("ProfileName")
    headers = {} if signature is None else {"X-Twilio-Signature": signature}
    response = client.post("/twilio/webhook", data=form, headers=headers, base_url=PUBLIC_BASE)
    assert response.status_code == 403
    assert "signature" in response.get_json()["error"].lower()
    with app.app_context():
        assert count(Message) == 0 and count(Contact) == 0


def test_status_callbacks_are_verified_too(app, client):
    form = status_form("SM" + "0" * 32, "delivered")
    response = client.post("/twilio/webhook", data=form, headers={"X-Twilio-Signature": "x"}, base_url=PUBLIC_BASE)
    assert response.status_code == 403
    with app.app_context():
        assert count(StatusEvent) == 0


def test_signature_behind_a_tls_proxy_without_configured_url(base_config, _schema):
    """With no TWILIO_WEBHOOK_URL, ProxyFix rebuilds the public https URL Twilio signed from the
    router's X-Forwarded-Proto and the Host it forwards; X-Forwarded-Host is not trusted."""
    from bot import create_app

    app = create_app({**base_config, "TWILIO_WEBHOOK_URL": None, "TESTING": True})
    form = inbound_form()
    public = "https://bot.example.org/twilio/webhook"
    signature = sign(AUTH_TOKEN, public, form)
    client = app.test_client()
    # The router talks plain http to the app and forwards the public Host (as Heroku's does).
    proxied = {"X-Twilio-Signature": signature, "X-Forwarded-Proto": "https"}
    assert client.post("/twilio/webhook", data=form, headers=proxied, base_url="http://bot.example.org").status_code == 200
    direct = {"X-Twilio-Signature": signature}
    assert client.post("/twilio/webhook", data=form, headers=direct, base_url="http://bot.example.org").status_code == 403
    # A request signed for another app of the same Twilio account, its host named in
    # X-Forwarded-Host, is checked against this app's URL and refused.
    other = "https://other-app.example.org/twilio/webhook"
    forged = {"X-Twilio-Signature": sign(AUTH_TOKEN, other, form), "X-Forwarded-Proto": "https",
              "X-Forwarded-Host": "other-app.example.org"}
    assert client.post("/twilio/webhook", data=form, headers=forged, base_url="http://bot.example.org").status_code == 403
    with app.app_context():
        db.engine.dispose()


def test_query_string_is_part_of_the_signed_url(client):
    form = inbound_form()
    url = WEBHOOK_URL + "?tenant=42"
    response = client.post("/twilio/webhook?tenant=42", data=form,
                           headers={"X-Twilio-Signature": sign(AUTH_TOKEN, url, form)}, base_url=PUBLIC_BASE)
    assert response.status_code == 200
    response = client.post("/twilio/webhook?tenant=43", data=form,
                           headers={"X-Twilio-Signature": sign(AUTH_TOKEN, url, form)}, base_url=PUBLIC_BASE)
    assert response.status_code == 403


# --- inbound messages -----------------------------------------------------------------------

def test_inbound_is_stored_once_and_updates_the_contact(app, post_webhook):
    form = inbound_form("+15557654321", "Hi there", ProfileName="Grace", WaId="15557654321")
    assert post_webhook(form).status_code == 200
    assert post_webhook(form).status_code == 200  # Twilio retried: same MessageSid
    with app.app_context():
        [message] = db.session.scalars(sa.select(Message)).all()
        contact = db.session.get(Contact, message.contact_id)
        assert (message.direction, message.body, message.twilio_sid) == ("inbound", "Hi there", form["MessageSid"])
        assert message.payload["ProfileName"] == "Grace"
        assert (contact.phone, contact.profile_name, contact.wa_id) == ("+15557654321", "Grace", "15557654321")
        assert utcnow() - contact.last_inbound_at < timedelta(minutes=1)
    assert huey.pending_count() == 1  # one task to process it, not two
    run_queue()
    with app.app_context():
        assert db.session.scalar(sa.select(Message.status).where(Message.direction == "inbound")) == "processed"


def test_inbound_opens_the_window_for_free_form_replies(app, client, auth, post_webhook):
    with app.app_context():
        make_contact(inbound_ago=None)
    payload = {"to": "+15551234567", "body": "Thanks for writing"}
    assert client.post("/notify", json=payload, headers=auth).status_code == 422
    post_webhook(inbound_form("+15551234567"))
    assert client.post("/notify", json=payload, headers=auth).status_code == 202


def test_inbound_media_and_unknown_fields_are_kept(app, post_webhook):
    form = inbound_form(body="", NumMedia="2", MediaUrl0="https://api.twilio.com/m/0",
                        MediaContentType0="image/jpeg", MediaUrl1="https://api.twilio.com/m/1",
                        MediaContentType1="application/pdf", Latitude="52.5", Longitude="13.4",
                        SomeFieldTwilioAddsTomorrow="yes")
    assert post_webhook(form).status_code == 200
    with app.app_context():
        message = db.session.scalar(sa.select(Message))
        assert message.media_urls == ["https://api.twilio.com/m/0", "https://api.twilio.com/m/1"]
        assert message.payload["Latitude"] == "52.5"
        assert message.payload["SomeFieldTwilioAddsTomorrow"] == "yes"


@pytest.mark.parametrize("missing, field", [("MessageSid", "MessageSid"), ("From", "From")])
def test_signed_but_incomplete_inbound_is_a_clear_400(app, post_webhook, missing, field):
    form = inbound_form()
    form.pop(missing)
    response = post_webhook(form)
    assert response.status_code == 400
    assert field in response.get_json()["error"]


def test_inbound_from_a_non_number_is_a_clear_400(app, post_webhook):
    form = inbound_form()
    form["From"] = "whatsapp:not-a-number"
    response = post_webhook(form)
    assert response.status_code == 400 and "From" in response.get_json()["error"]
    with app.app_context():
        assert count(Message) == 0


# --- status callbacks (invariant 3) ---------------------------------------------------------

def sent_message(app, client, auth) -> tuple[str, str]:
    """Send a notification through the simulator; return (message id, Twilio SID)."""
    with app.app_context():
        if count(Contact) == 0:
            make_contact()
    message_id = client.post("/notify", json={"to": "+15551234567", "body": "hi"}, headers=auth).get_json()["id"]
    run_queue()
    with app.app_context():
        return message_id, db.session.get(Message, message_id).twilio_sid


def stored(app, message_id: str) -> Message:
    with app.app_context():
        return db.session.get(Message, message_id)


CALLBACKS = ["queued", "sending", "sent", "delivered", "read"]


@pytest.mark.parametrize("order", random.Random(7).sample(list(itertools.permutations(CALLBACKS)), 12))
def test_status_never_goes_backwards_whatever_the_order(app, client, auth, post_webhook, order):
    message_id, sid = sent_message(app, client, auth)
    highest = 0
    for status in order:
        assert post_webhook(status_form(sid, status)).status_code == 200
        highest = max(highest, STATUS_RANK[status])
        assert STATUS_RANK[stored(app, message_id).status] == highest
    assert stored(app, message_id).status == "read"
    with app.app_context():
        assert sorted(e.status for e in db.session.scalars(sa.select(StatusEvent))) == sorted(CALLBACKS)


def test_repeated_callbacks_are_kept_once(app, client, auth, post_webhook):
    message_id, sid = sent_message(app, client, auth)
    for _ in range(3):
        assert post_webhook(status_form(sid, "delivered")).status_code == 200
    with app.app_context():
        assert count(StatusEvent) == 1


def test_error_code_survives_a_later_higher_status(app, client, auth, post_webhook):
    message_id, sid = sent_message(app, client, auth)
    post_webhook(status_form(sid, "undelivered", error_code=30003))
    post_webhook(status_form(sid, "read"))  # cannot happen in theory; must not erase the code
    row = stored(app, message_id)
    assert (row.status, row.error_code) == ("read", 30003)


def test_failed_with_code_after_sent(app, client, auth, post_webhook):
    message_id, sid = sent_message(app, client, auth)
    post_webhook(status_form(sid, "sent"))
    form = status_form(sid, "failed", error_code=63016)
    form["ChannelStatusMessage"] = "Outside the allowed window"
    post_webhook(form)
    row = stored(app, message_id)
    assert (row.status, row.error_code, row.error_message) == ("failed", 63016, "Outside the allowed window")
    post_webhook(status_form(sid, "sent"))
    assert stored(app, message_id).status == "failed"


def test_callback_before_the_sid_is_recorded_is_applied_later(app, client, auth, post_webhook, twilio):
    """Twilio's callback can beat the create() answer: it is kept, then applied when the SID lands."""
    with app.app_context():
        make_contact()
    message_id = client.post("/notify", json={"to": "+15551234567", "body": "hi"}, headers=auth).get_json()["id"]
    early_sid = "SM" + "e" * 32
    assert post_webhook(status_form(early_sid, "delivered")).status_code == 200
    with app.app_context():
        event = db.session.scalar(sa.select(StatusEvent))
        assert event.message_id is None
        # The send now records that very SID (as if Twilio's answer arrived after the callback).
        from bot.delivery.claims import claim
        from bot.channels.outcomes import Accepted
        from bot.channels.whatsapp.channel import WhatsAppChannel
        from bot.delivery.sender import record_accepted
        claimed = claim(message_id)
        assert claimed is not None
        record_accepted(claimed, WhatsAppChannel(), Accepted(early_sid, "queued"))
    row = stored(app, message_id)
    assert row.status == "delivered"
    with app.app_context():
        assert db.session.scalar(sa.select(StatusEvent.message_id)) == message_id


def test_sweep_applies_events_a_race_left_unlinked(app, client, auth, post_webhook):
    from bot.delivery import statuses

    message_id, sid = sent_message(app, client, auth)
    post_webhook(status_form(sid, "delivered"))
    with app.app_context():  # simulate the race: event stored, never linked or applied
        db.session.execute(sa.update(StatusEvent).values(message_id=None))
        db.session.execute(sa.update(Message).values(status="queued", status_rank=STATUS_RANK["queued"]))
        db.session.commit()
        assert statuses.apply_orphan_events() == 1
    assert stored(app, message_id).status == "delivered"


def test_inbound_status_callbacks_and_unknown_statuses_do_not_fail(app, client, auth, post_webhook):
    message_id, sid = sent_message(app, client, auth)
    assert post_webhook(status_form(sid, "received")).status_code == 200
    assert post_webhook(status_form(sid, "partially_delivered")).status_code == 200
    assert stored(app, message_id).status == "queued"
    with app.app_context():
        assert [e.status for e in db.session.scalars(sa.select(StatusEvent))] == ["partially_delivered"]



@pytest.mark.parametrize("field, value, expected", [
    ("MessageSid", "SM" + "a" * 200, "MessageSid"),
    ("MessageSid", "not a sid", "MessageSid"),
    ("MessageStatus", "x" * 40, "MessageStatus"),
])
def test_malformed_callback_fields_are_a_clear_400(app, post_webhook, field, value, expected):
    form = status_form("SM" + "1" * 32, "delivered")
    form[field] = value
    response = post_webhook(form)
    assert response.status_code == 400 and expected in response.get_json()["error"]
    with app.app_context():
        assert count(StatusEvent) == 0


def test_oversized_values_never_cause_a_500(app, client, auth, post_webhook):
    message_id, sid = sent_message(app, client, auth)
    assert post_webhook(status_form(sid, "failed", error_code=99999999999999)).status_code == 200
    row = stored(app, message_id)
    assert row.status == "failed" and row.error_code is None
    form = inbound_form(ProfileName="N" * 1000, WaId="9" * 100)
    assert post_webhook(form).status_code == 200
    with app.app_context():
        contact = db.session.scalar(sa.select(Contact).where(Contact.profile_name.is_not(None)))
        assert contact.profile_name == "N" * 256


def test_nul_characters_and_absurd_media_counts_never_cause_a_500(app, post_webhook):
    form = inbound_form(body="he\x00llo", NumMedia="20000000", MediaUrl0="https://m/0", ProfileName="A\x00da")
    assert post_webhook(form).status_code == 200
    with app.app_context():
        row = db.session.scalar(sa.select(Message).where(Message.twilio_sid == form["MessageSid"]))
        assert row.body == "hello" and row.media_urls == ["https://m/0"]
    callback = status_form("SM" + "a" * 32, "failed", 30008)
    callback["ErrorMessage"] = "bad\x00news"
    assert post_webhook(callback).status_code == 200
    with app.app_context():
        event = db.session.scalar(sa.select(StatusEvent).where(StatusEvent.twilio_sid == callback["MessageSid"]))
        assert event.error_message == "badnews"


def test_a_status_callback_naming_an_inbound_message_leaves_it_to_the_engine(app, post_webhook):
    form = inbound_form(body="hello")
    post_webhook(form)
    huey.flush()  # not processed yet
    assert post_webhook(status_form(form["MessageSid"], "delivered")).status_code == 200
    with app.app_context():
        row = db.session.scalar(sa.select(Message).where(Message.twilio_sid == form["MessageSid"]))
        assert row.status == "received"
