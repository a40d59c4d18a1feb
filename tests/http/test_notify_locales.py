"""POST /notify in the user's language: the ContentSid and the email copy that reach the simulators
follow the user's `locale` (exact, its language, DEFAULT_LOCALE); a template with copy only in other
languages is refused with a 400 naming the template and the locale, and nothing is sent."""
from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from bot.models import Message
from tests.conftest import CONTENT_SIDS, make_contact, run_queue, status_form

SID = {locale: "HX" + digit * 32 for locale, digit in (("en", "1"), ("pt-BR", "2"), ("pt", "3"), ("es", "4"))}
PER_LOCALE = {
    **CONTENT_SIDS,
    "order_update": {"en": SID["en"], "pt-BR": SID["pt-BR"], "pt": SID["pt"]},
    "promo": {"pt-BR": SID["pt-BR"], "es": SID["es"]},  # no copy in the default locale
}
WHATSAPP_ONLY = ["whatsapp"]


@pytest.fixture
def per_locale(app: Flask) -> None:
    app.config["TWILIO_CONTENT_SIDS"] = PER_LOCALE


def _user(client: FlaskClient, auth: dict, user_id: str, locale: str | None, **fields: Any) -> None:
    body = {"phone": "+1555123" + str(4000 + len(user_id) * 100 + sum(map(ord, user_id)) % 100),
            "channels": WHATSAPP_ONLY, **fields}
    if locale is not None:
        body["locale"] = locale
    answer = client.put(f"/users/{user_id}", json=body, headers=auth)
    assert answer.status_code in (200, 201), answer.get_json()


def _sent_content_sid(twilio: TwilioSimulator) -> str:
    [sent] = twilio.messages
    assert "Body" not in sent["form"]
    return sent["form"]["ContentSid"]


@pytest.mark.parametrize("locale, expected", [
    ("pt-BR", "pt-BR"),  # exact
    ("pt-PT", "pt"),  # its language
    ("fr", "en"),  # the default locale
    (None, "en"),  # no locale known: the default
])
def test_a_users_locale_picks_the_approved_template(app, client, auth, twilio, per_locale, locale, expected):
    _user(client, auth, "ana", locale)
    answer = client.post("/notify", json={"user_id": "ana", "template": "order_update",
                                          "variables": {"1": "Ana", "2": 7}}, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    run_queue()
    assert _sent_content_sid(twilio) == SID[expected]
    with app.app_context():
        assert db.session.get(Message, answer.get_json()["id"]).content_sid == SID[expected]


def test_a_locale_with_no_template_is_refused_locally(app, client, auth, twilio, per_locale):
    _user(client, auth, "fred", "fr")
    answer = client.post("/notify", json={"user_id": "fred", "template": "promo"}, headers=auth)
    assert answer.status_code == 400
    body = answer.get_json()
    assert "'promo'" in body["error"] and "'fr'" in body["error"]
    assert (body["template"], body["locale"]) == ("promo", "fr")
    assert body["skipped"] == {"whatsapp": "no_copy_in_locale"}
    run_queue()
    assert twilio.requests == []  # never the wrong language, never a request to Twilio
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0
    # The same template in the user's language goes.
    _user(client, auth, "joao", "pt-BR")
    assert client.post("/notify", json={"user_id": "joao", "template": "promo"}, headers=auth).status_code == 202
    run_queue()
    assert _sent_content_sid(twilio) == SID["pt-BR"]


def test_by_number_the_contacts_stored_locale_picks_the_template(app, client, auth, twilio, per_locale):
    _user(client, auth, "bia", "pt-BR", phone="+15551239001")
    with app.app_context():
        make_contact("+15551239002", inbound_ago=None)  # wrote first, no locale: the default
    for phone in ("+15551239001", "+15551239002"):
        answer = client.post("/notify", json={"to": phone, "template": "order_update"}, headers=auth)
        assert answer.status_code == 202, answer.get_json()
    run_queue()
    sids = {message["to"]: message["form"]["ContentSid"] for message in twilio.messages}
    assert sids == {"whatsapp:+15551239001": SID["pt-BR"], "whatsapp:+15551239002": SID["en"]}
    unknown = client.post("/notify", json={"to": "+15551239003", "template": "promo"}, headers=auth)
    assert unknown.status_code == 400 and "'promo'" in unknown.get_json()["error"]


def test_a_single_sid_is_the_default_locales_for_everyone(client, auth, twilio):
    """TWILIO_CONTENT_SIDS as it always was (one SID per name): every locale falls back to it."""
    _user(client, auth, "rui", "pt-BR")
    assert client.post("/notify", json={"user_id": "rui", "template": "order_update"}, headers=auth).status_code == 202
    run_queue()
    assert _sent_content_sid(twilio) == CONTENT_SIDS["order_update"]


def test_a_contentsid_named_directly_is_sent_as_it_is(client, auth, twilio, per_locale):
    _user(client, auth, "eva", "fr")
    direct = "HX" + "e5" * 16
    assert client.post("/notify", json={"user_id": "eva", "template": direct}, headers=auth).status_code == 202
    run_queue()
    assert _sent_content_sid(twilio) == direct


def test_the_default_locale_is_a_setting(app, client, auth, twilio, per_locale):
    app.config["DEFAULT_LOCALE"] = "es"
    _user(client, auth, "fritz", "de")
    assert client.post("/notify", json={"user_id": "fritz", "template": "promo"}, headers=auth).status_code == 202
    run_queue()
    assert _sent_content_sid(twilio) == SID["es"]


# ------------------------------------------------------------------ email copy


def _email_user(client: FlaskClient, auth: dict, user_id: str, locale: str | None) -> None:
    body = {"email": f"{user_id}@example.com", "name": "Ana", "channels": ["email"]}
    if locale:
        body["locale"] = locale
    assert client.put(f"/users/{user_id}", json=body, headers=auth).status_code in (200, 201)


@pytest.mark.parametrize("locale, subject, greeting", [
    ("pt-BR", "Novo acesso à sua conta", "Olá Ana,"),
    ("en-GB", "New sign-in to your account", "Hi Ana,"),
    ("pt-PT", "New sign-in to your account", "Hi Ana,"),  # no pt copy: the default locale's
    (None, "New sign-in to your account", "Hi Ana,"),
])
def test_email_copy_in_the_users_locale(client, auth, twilio, locale, subject, greeting):
    _email_user(client, auth, "mail-user", locale)
    answer = client.post("/notify", json={"user_id": "mail-user", "template": "login",
                                          "variables": {"device": "Firefox"}}, headers=auth)
    assert answer.status_code == 202 and answer.get_json()["channel"] == "email"
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["subject"] == subject
    assert email["text"].startswith(greeting) and "Firefox" in email["text"]
    assert greeting in email["html"]


def test_email_copy_only_in_other_languages_is_refused(app, client, auth, twilio, tmp_path, monkeypatch):
    """An email template with pt-BR copy alone: an English-speaking user gets a 400, not Portuguese."""
    import bot.channels.email.copy as copy_module
    from bot import locales

    for part, text in (("subject.txt", "Promoção"), ("body.txt", "Olá {{ name }}")):
        (tmp_path / "email" / "promo" / "pt-BR").mkdir(parents=True, exist_ok=True)
        (tmp_path / "email" / "promo" / "pt-BR" / part).write_text(text)
    monkeypatch.setattr(copy_module, "TEMPLATES_DIR", tmp_path)
    monkeypatch.setattr(locales.templates_dir, "TEMPLATES_DIR", tmp_path)
    copy_module.environment.cache_clear()
    copy_module.email_templates.cache_clear()
    try:
        _email_user(client, auth, "en-user", "en")
        refused = client.post("/notify", json={"user_id": "en-user", "template": "promo"}, headers=auth)
        assert refused.status_code == 400, refused.get_json()
        assert refused.get_json()["skipped"] == {"email": "no_copy_in_locale"}
        assert "'promo'" in refused.get_json()["error"] and "'en'" in refused.get_json()["error"]
        _email_user(client, auth, "pt-user", "pt-BR")
        assert client.post("/notify", json={"user_id": "pt-user", "template": "promo"}, headers=auth).status_code == 202
        run_queue()
        [email] = twilio.sendgrid.wait_for_emails(1)
        assert email["subject"] == "Promoção" and email["text"].startswith("Olá Ana")
    finally:
        monkeypatch.undo()
        copy_module.environment.cache_clear()
        copy_module.email_templates.cache_clear()


# ------------------------------------------------------------------ a fallback keeps the language


def test_a_fallback_to_email_is_in_the_users_language(client, auth, twilio, post_webhook, per_locale):
    client.put("/users/lia", json={"phone": "+15551239101", "email": "lia@example.com", "locale": "pt-BR",
                                   "channels": ["whatsapp", "email"]}, headers=auth)
    first = client.post("/notify", json={"user_id": "lia", "template": "order_update",
                                         "variables": {"1": "Lia", "2": "42"}}, headers=auth).get_json()
    run_queue()
    [sent] = twilio.wait_for_messages(1)
    assert sent["form"]["ContentSid"] == SID["pt-BR"]
    post_webhook(status_form(sent["sid"], "failed", 63024, to="+15551239101"))
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["subject"] == "Seu pedido 42 tem uma atualização" and email["text"].startswith("Olá Lia,")
    assert client.get(first["url"], headers=auth).get_json()["fallback"] is not None


def test_a_fallback_to_whatsapp_carries_the_template_in_the_users_language(client, auth, twilio, per_locale):
    client.put("/users/lu", json={"phone": "+15551239102", "email": "lu@example.com", "locale": "pt-PT",
                                  "channels": ["email", "whatsapp"]}, headers=auth)
    client.post("/notify", json={"user_id": "lu", "template": "order_update",
                                 "variables": {"1": "Lu", "2": "43"}}, headers=auth)
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["text"].startswith("Hi Lu,")  # no pt email copy: the default locale's
    body = json.dumps([twilio.sendgrid.event(email, "bounce", reason="550 no such user")]).encode()
    assert client.post("/sendgrid/events", data=body, headers=twilio.sendgrid.signed_headers(body)).status_code < 300
    run_queue()
    [sent] = twilio.wait_for_messages(1)
    assert sent["form"]["ContentSid"] == SID["pt"]  # pt-PT -> its language's approved template
