"""The message's locale as data (docs/ARCHITECTURE.md, "Languages"): each outbound message stores
the locale its copy was resolved to when it was made (/notify, broadcasts, flow replies,
fallbacks), its email is rendered in that locale at send time whatever the user's locale is by
then, and `GET /messages/<id>`, the 202 answer and the message's signed events say it. Through
HTTP, the Twilio and SendGrid simulators and signed webhooks."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from bot.clock import isoformat, utcnow
from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from bot.models import Contact, Message
from tests.conftest import inbound_form, make_contact, run_queue, status_form
from tests.delivery.test_events import (AUTH, Receiver, events_app, post_webhook as post_signed,  # noqa: F401
                                        receiver)
from tests.http.test_notify_locales import PER_LOCALE, SID

LOGIN = {"template": "login", "variables": {"device": "Firefox"}}


@pytest.fixture
def per_locale(app: Flask) -> None:
    app.config["TWILIO_CONTENT_SIDS"] = PER_LOCALE


def _put(client: FlaskClient, auth: dict, user_id: str, **fields) -> None:
    answer = client.put(f"/users/{user_id}", json=fields, headers=auth)
    assert answer.status_code in (200, 201), answer.get_json()


def _locale(client: FlaskClient, auth: dict, message_id: str) -> str | None:
    answer = client.get(f"/messages/{message_id}", headers=auth)
    assert answer.status_code == 200
    return answer.get_json()["locale"]


def test_an_email_is_rendered_in_the_locale_stored_at_notify_not_the_users_current_one(
        client: FlaskClient, auth: dict, twilio: TwilioSimulator) -> None:
    _put(client, auth, "ana", email="ana@example.com", name="Ana", locale="pt-BR", channels=["email"])
    answer = client.post("/notify", json={"user_id": "ana", **LOGIN}, headers=auth)
    assert answer.status_code == 202 and answer.get_json()["locale"] == "pt-BR"
    # The user's locale changes before the worker sends: the message keeps its own.
    _put(client, auth, "ana", locale="en")
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["subject"] == "Novo acesso à sua conta" and email["text"].startswith("Olá Ana,")
    assert _locale(client, auth, answer.get_json()["id"]) == "pt-BR"
    # A new message follows the new locale.
    again = client.post("/notify", json={"user_id": "ana", **LOGIN}, headers=auth)
    assert again.get_json()["locale"] == "en"
    run_queue()
    assert twilio.sendgrid.wait_for_emails(2)[-1]["subject"] == "New sign-in to your account"


@pytest.mark.parametrize("locale, stored", [("pt-BR", "pt-BR"), ("pt-PT", "pt"), ("fr", "en"), (None, "en")])
def test_a_whatsapp_templates_locale_is_the_content_sids(client, auth, twilio, per_locale, locale, stored) -> None:
    _put(client, auth, "bia", phone="+15551238001", channels=["whatsapp"], **({"locale": locale} if locale else {}))
    answer = client.post("/notify", json={"user_id": "bia", "template": "order_update"}, headers=auth)
    assert answer.status_code == 202 and answer.get_json()["locale"] == stored
    run_queue()
    [sent] = twilio.messages
    assert sent["form"]["ContentSid"] == SID[stored]
    assert _locale(client, auth, answer.get_json()["id"]) == stored


def test_by_number_free_text_and_a_named_contentsid_have_no_locale(app, client, auth, twilio, per_locale) -> None:
    _put(client, auth, "caio", phone="+15551238002", locale="pt-BR")
    with app.app_context():
        make_contact("+15551238003")  # wrote first, no locale
    templated = client.post("/notify", json={"to": "+15551238002", "template": "order_update"}, headers=auth)
    default = client.post("/notify", json={"to": "+15551238003", "template": "order_update"}, headers=auth)
    named = client.post("/notify", json={"to": "+15551238002", "template": "HX" + "e5" * 16}, headers=auth)
    with app.app_context():
        db.session.execute(sa.update(Contact).values(last_inbound_at=utcnow() - timedelta(minutes=5)))
        db.session.commit()
    text = client.post("/notify", json={"to": "+15551238003", "body": "hello"}, headers=auth)
    assert templated.get_json()["locale"] == "pt-BR"
    assert default.get_json()["locale"] == "en"
    assert named.get_json()["locale"] is None and text.get_json()["locale"] is None
    run_queue()
    assert {m["form"].get("ContentSid") for m in twilio.messages} >= {SID["pt-BR"], SID["en"]}
    assert _locale(client, auth, named.get_json()["id"]) is None


def test_a_flows_replies_store_the_locale_of_their_copy(app, client, auth, twilio, post_webhook) -> None:
    _put(client, auth, "dora", phone="+15551238004", name="Dora", locale="pt-BR")
    with app.app_context():
        db.session.execute(sa.update(Contact).values(last_inbound_at=utcnow() - timedelta(minutes=5)))
        db.session.commit()
    answer = client.post("/notify", json={"user_id": "dora", "flow": "appointment",
                                          "variables": {"name": "Dora", "date": "12/03", "time": "10:30"}},
                         headers=auth)
    assert answer.status_code == 202
    run_queue()
    assert post_webhook(inbound_form("+15551238004", "1")).status_code == 200
    run_queue()
    assert len(twilio.messages) == 2 and "confirmada" in twilio.messages[-1]["body"]
    with app.app_context():
        replies = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")).all()
        assert len(replies) == 2 and {row.locale for row in replies} == {"pt-BR"}


def test_a_broadcasts_messages_store_each_recipients_locale(app, client, auth, twilio, per_locale) -> None:
    for number, locale in enumerate(("pt-BR", "pt-PT", "de")):
        _put(client, auth, f"b{number}", phone=f"+155512381{number:02d}", name="B", locale=locale)
    accepted = client.post("/broadcasts", json={"audience": {"user_ids": ["b0", "b1", "b2"]},
                                                "template": "order_update", "variables": {"1": "x", "2": "y"}},
                           headers=auth)
    assert accepted.status_code == 202, accepted.get_json()
    run_queue(max_tasks=500)
    by_to = {m["to"]: m["form"]["ContentSid"] for m in twilio.messages}
    assert by_to == {"whatsapp:+15551238100": SID["pt-BR"], "whatsapp:+15551238101": SID["pt"],
                     "whatsapp:+15551238102": SID["en"]}
    with app.app_context():
        rows = db.session.execute(sa.select(Contact.phone, Message.locale).join(Contact)).all()
    assert dict(rows) == {"+15551238100": "pt-BR", "+15551238101": "pt", "+15551238102": "en"}


def test_a_fallback_stores_its_own_copys_locale(app, client, auth, twilio, post_webhook, per_locale) -> None:
    _put(client, auth, "lia", phone="+15551238201", email="lia@example.com", locale="pt-BR",
         channels=["whatsapp", "email"], name="Lia")
    first = client.post("/notify", json={"user_id": "lia", "template": "order_update",
                                         "variables": {"1": "Lia", "2": "42"}}, headers=auth).get_json()
    run_queue()
    [sent] = twilio.wait_for_messages(1)
    post_webhook(status_form(sent["sid"], "failed", 63024, to="+15551238201"))
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["text"].startswith("Olá Lia,")
    fallback = client.get(first["url"], headers=auth).get_json()["fallback"]
    assert _locale(client, auth, first["id"]) == "pt-BR" and _locale(client, auth, fallback) == "pt-BR"


def test_the_messages_signed_events_carry_its_locale(events_app, receiver) -> None:  # noqa: F811
    events_app.config["TWILIO_CONTENT_SIDS"] = PER_LOCALE
    client = events_app.test_client()
    assert client.put("/users/eva", json={"phone": "+15551238301", "locale": "pt-PT"},
                      headers=AUTH).status_code in (200, 201)
    now_id = client.post("/notify", json={"user_id": "eva", "template": "order_update"}, headers=AUTH).get_json()["id"]
    later = isoformat(utcnow() + timedelta(days=1)).replace("Z", "+00:00")
    held = client.post("/notify", json={"user_id": "eva", "template": "order_update", "send_at": later},
                       headers=AUTH).get_json()["id"]
    run_queue()
    with events_app.app_context():
        sid = db.session.get(Message, now_id).twilio_sid
    # A status callback (on PostgreSQL one statement writes its event: the same fields).
    assert post_signed(events_app, status_form(sid, "delivered", to="+15551238301")).status_code == 200
    assert client.post(f"/messages/{held}/cancel", headers=AUTH).status_code == 200
    run_queue()
    assert receiver.rejected == 0
    seen = {(event["type"], event["data"].get("status")): event["data"] for event in receiver.delivered()}
    assert {("message.status", "queued"), ("message.status", "delivered"), ("message.held", None),
            ("message.canceled", None)} <= set(seen)
    for key in (("message.status", "queued"), ("message.status", "delivered"), ("message.held", None),
                ("message.canceled", None)):
        assert seen[key]["locale"] == "pt", (key, seen[key])
    listed = client.get("/events?type=message.status", headers=AUTH).get_json()["events"]
    assert listed and all(event["data"]["locale"] == "pt" for event in listed)
    assert json.dumps(listed)  # readable as the backend reads it
