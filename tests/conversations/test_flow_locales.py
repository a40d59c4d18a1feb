"""Flows answer in the user's locale: the engine's replies render templates/<flow>/<locale>/ copy
(else its language's, else the default copy), through signed webhooks, the queue and the Twilio
simulator; a backend-started flow outside the window opens with the approved template in the
user's language, or is refused with a 400."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.extensions import db
from bot.models import Contact
from tests.conftest import CONTENT_SIDS, inbound_form, run_queue

PHONE = "+15551237001"
APPOINTMENT = {"flow": "appointment", "variables": {"name": "Ana", "date": "12/03", "time": "10:30"}}


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield


def _bodies(twilio) -> list[str]:
    return [message["body"] for message in twilio.messages]


def _put_user(client, auth, locale: str | None, phone: str = PHONE) -> None:
    body = {"phone": phone, "name": "Ana", "locale": locale}
    assert client.put("/users/ana", json=body, headers=auth).status_code in (200, 201)


def _wrote_recently(phone: str = PHONE) -> None:
    db.session.execute(sa.update(Contact).where(Contact.phone == phone)
                       .values(last_inbound_at=utcnow() - timedelta(minutes=5)))
    db.session.commit()


@pytest.mark.parametrize("locale, reminder, confirmed", [
    ("pt-BR", "Lembrete da sua consulta de *12/03* às *10:30*", "Sua consulta de *12/03* às *10:30* está confirmada"),
    ("en", "Just a reminder of your appointment on *12/03* at *10:30*", "Your appointment on *12/03* at *10:30* is confirmed"),
    ("de", "Just a reminder of your appointment on *12/03* at *10:30*", "Your appointment on *12/03* at *10:30* is confirmed"),
])
def test_a_flow_answers_in_the_users_locale(ctx, client, auth, twilio, post_webhook, locale, reminder, confirmed):
    _put_user(client, auth, locale)
    _wrote_recently()
    answer = client.post("/notify", json={"user_id": "ana", **APPOINTMENT}, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    run_queue()
    [sent] = _bodies(twilio)
    assert reminder in sent
    assert post_webhook(inbound_form(PHONE, "1")).status_code == 200
    run_queue()
    assert confirmed in _bodies(twilio)[-1]


def test_someone_who_wrote_first_gets_the_default_then_what_the_backend_set(ctx, client, auth, twilio, post_webhook):
    post_webhook(inbound_form(PHONE, "help"))
    run_queue()
    assert _bodies(twilio)[-1].startswith("You are chatting with")  # no locale: the default copy
    _put_user(client, auth, "pt-BR")  # the backend claims the number and sets the locale
    post_webhook(inbound_form(PHONE, "help"))
    run_queue()
    assert _bodies(twilio)[-1].startswith("Você está conversando com")


def test_outside_the_window_the_flow_opens_with_the_template_in_the_users_language(ctx, app, client, auth, twilio):
    pt, en = "HX" + "a7" * 16, "HX" + "b8" * 16
    app.config["TWILIO_CONTENT_SIDS"] = {**CONTENT_SIDS, "appointment_reminder": {"en": en, "pt-BR": pt}}
    _put_user(client, auth, "pt-BR")  # never wrote: only an approved template may open
    assert client.post("/notify", json={"user_id": "ana", **APPOINTMENT}, headers=auth).status_code == 202
    run_queue()
    [sent] = twilio.messages
    assert sent["form"]["ContentSid"] == pt


def test_a_flow_whose_template_is_not_in_the_users_language_is_refused(ctx, app, client, auth, twilio):
    app.config["TWILIO_CONTENT_SIDS"] = {**CONTENT_SIDS, "appointment_reminder": {"es": "HX" + "c9" * 16}}
    _put_user(client, auth, "pt-BR")
    answer = client.post("/notify", json={"user_id": "ana", **APPOINTMENT}, headers=auth)
    assert answer.status_code == 400
    assert "'appointment_reminder'" in answer.get_json()["error"] and "'pt-BR'" in answer.get_json()["error"]
    run_queue()
    assert twilio.requests == []


def test_the_translated_words_answer_the_flow_too(ctx, client, auth, twilio, post_webhook):
    _put_user(client, auth, "pt-BR")
    _wrote_recently()
    assert client.post("/notify", json={"user_id": "ana", **APPOINTMENT}, headers=auth).status_code == 202
    run_queue()
    post_webhook(inbound_form(PHONE, "Remarcar"))
    run_queue()
    assert _bodies(twilio)[-1].startswith("Sem problema! Qual horário seria melhor para você?")
    post_webhook(inbound_form(PHONE, "quinta às 15h"))
    run_queue()
    assert _bodies(twilio)[-1] == "Obrigado! Anotamos sua preferência: quinta às 15h\nVamos entrar em contato para confirmar o novo horário."
