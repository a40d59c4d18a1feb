"""No full phone number or email address in an error body, whatever the route refuses."""
from __future__ import annotations

from flask import Flask

from bot.conversations.users import find_user
from bot.extensions import db
from bot.vocabulary import Consent
from tests.conftest import make_contact

NUMBER = "+15551239876"
DIGITS = "5551239876"


def test_refusals_name_no_number_or_address(app: Flask, client, auth) -> None:
    with app.app_context():
        make_contact(NUMBER, consent=Consent.OPTED_OUT, inbound_ago=None)
    answers = [
        client.get("/contacts/+15551230000", headers=auth),  # unknown contact
        client.post("/notify", json={"to": NUMBER, "body": "hi"}, headers=auth),  # opted out
        client.post("/notify", json={"to": "+15551230001", "body": "hi"}, headers=auth),  # window closed
    ]
    client.put("/users/e1", json={"email": "private@example.com", "phone": "+15551230002"}, headers=auth)
    with app.app_context():
        find_user("e1").email_consent = Consent.OPTED_OUT
        db.session.commit()
    answers += [
        client.put("/users/e2", json={"email": "PRIVATE@example.com"}, headers=auth),  # taken
        client.post("/notify", json={"user_id": "e1", "channel": "email", "subject": "s", "body": "b"}, headers=auth),
    ]
    for answer in answers:
        assert 400 <= answer.status_code < 500, answer.get_json()
        text = answer.get_data(as_text=True)
        for secret in (DIGITS, "5551230000", "5551230001", "private@example.com"):
            assert secret not in text.lower(), (answer.status_code, text)
