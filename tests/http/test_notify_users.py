"""POST /notify by the backend's user id: inline upsert, the user's channel order, a pinned channel."""
from __future__ import annotations

from datetime import timedelta

from flask import Flask
from flask.testing import FlaskClient

from bot.clock import utcnow
from bot.extensions import db
from bot.conversations.users import find_user
from bot.vocabulary import Consent

ADA = {"phone": "+15551230010", "email": "ada@example.com", "channels": ["whatsapp", "email"]}
RECEIPT = {"subject": "Your receipt", "body": "Thanks for your order"}


def _wrote_recently(app: Flask, user_id: str) -> None:
    with app.app_context():
        find_user(user_id).last_inbound_at = utcnow() - timedelta(minutes=5)
        db.session.commit()


def test_inline_user_then_free_text_goes_by_email_when_the_window_is_closed(client: FlaskClient, auth: dict) -> None:
    answer = client.post("/notify", json={"user_id": "u1", "user": ADA, **RECEIPT}, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    accepted = answer.get_json()
    assert accepted["channel"] == "email" and accepted["user_id"] == "u1" and accepted["to"] == "ada@example.com"
    message = client.get(accepted["url"], headers=auth).get_json()
    assert message["channel"] == "email" and message["subject"] == "Your receipt"
    assert client.get("/users/u1", headers=auth).status_code == 200  # the inline user is stored


def test_whatsapp_first_when_its_window_is_open(app: Flask, client: FlaskClient, auth: dict) -> None:
    client.put("/users/u2", json=ADA, headers=auth)
    _wrote_recently(app, "u2")
    accepted = client.post("/notify", json={"user_id": "u2", **RECEIPT}, headers=auth).get_json()
    assert accepted["channel"] == "whatsapp" and accepted["to"] == "+15551230010"


def test_the_users_order_decides(app: Flask, client: FlaskClient, auth: dict) -> None:
    client.put("/users/u3", json={**ADA, "channels": ["email", "whatsapp"]}, headers=auth)
    _wrote_recently(app, "u3")
    assert client.post("/notify", json={"user_id": "u3", **RECEIPT}, headers=auth).get_json()["channel"] == "email"


def test_a_pinned_channel_is_the_only_one(app: Flask, client: FlaskClient, auth: dict) -> None:
    client.put("/users/u4", json={"phone": "+15551230011"}, headers=auth)
    no_email = client.post("/notify", json={"user_id": "u4", "channel": "email", **RECEIPT}, headers=auth)
    assert no_email.status_code == 422 and no_email.get_json()["skipped"] == {"email": "no_address"}
    with app.app_context():
        find_user("u4").consent = Consent.OPTED_OUT
        db.session.commit()
    opted_out = client.post("/notify", json={"user_id": "u4", "channel": "whatsapp", **RECEIPT}, headers=auth)
    assert opted_out.status_code == 409
    assert "+15551230011" not in opted_out.get_json()["error"]


def test_opted_out_of_whatsapp_still_reached_by_email(app: Flask, client: FlaskClient, auth: dict) -> None:
    client.put("/users/u5", json=ADA, headers=auth)
    _wrote_recently(app, "u5")
    with app.app_context():
        find_user("u5").consent = Consent.OPTED_OUT
        db.session.commit()
    assert client.post("/notify", json={"user_id": "u5", **RECEIPT}, headers=auth).get_json()["channel"] == "email"
    with app.app_context():
        find_user("u5").email_consent = Consent.OPTED_OUT
        db.session.commit()
    both = client.post("/notify", json={"user_id": "u5", **RECEIPT}, headers=auth)
    assert both.status_code == 409
    assert both.get_json()["skipped"] == {"whatsapp": "opted_out", "email": "opted_out"}


def test_free_text_by_email_needs_a_subject(client: FlaskClient, auth: dict) -> None:
    client.put("/users/u6", json={"email": "six@example.com"}, headers=auth)
    answer = client.post("/notify", json={"user_id": "u6", "body": "hello"}, headers=auth)
    assert answer.status_code == 422 and answer.get_json()["skipped"]["email"] == "no_subject"


def test_recipient_fields_are_checked(client: FlaskClient, auth: dict) -> None:
    cases = [
        ({"body": "hi"}, "required"),
        ({"to": "+15551230012", "user_id": "x", "body": "hi"}, "not both"),
        ({"to": "+15551230012", "channel": "email", **RECEIPT}, "user_id"),
        ({"to": "+15551230012", "user": {"name": "A"}, "body": "hi"}, "'user'"),
        ({"user_id": "x", "user": {"email": "nope"}, **RECEIPT}, "'email'"),
        ({"user_id": "x", "user": [], **RECEIPT}, "'user'"),
        ({"user_id": "x", "channel": "sms", **RECEIPT}, "'channel'"),
        ({"user_id": "x" * 129, **RECEIPT}, "'user_id'"),
        ({"user_id": None, **RECEIPT}, "'user_id'"),
    ]
    for payload, fragment in cases:
        answer = client.post("/notify", json=payload, headers=auth)
        assert answer.status_code == 400, payload
        assert fragment in answer.get_json()["error"], (payload, answer.get_json())


def test_unknown_user_without_fields_is_404(client: FlaskClient, auth: dict) -> None:
    assert client.post("/notify", json={"user_id": "ghost", **RECEIPT}, headers=auth).status_code == 404


def test_a_phone_of_another_user_in_the_inline_user_is_409(client: FlaskClient, auth: dict) -> None:
    client.put("/users/a", json={"phone": "+15551230013"}, headers=auth)
    answer = client.post("/notify", json={"user_id": "b", "user": {"phone": "+15551230013"}, **RECEIPT}, headers=auth)
    assert answer.status_code == 409


def test_idempotency_key_replays_a_users_message(client: FlaskClient, auth: dict) -> None:
    headers = {**auth, "Idempotency-Key": "k-user-1"}
    first = client.post("/notify", json={"user_id": "u7", "user": ADA, **RECEIPT}, headers=headers)
    again = client.post("/notify", json={"user_id": "u7", "user": ADA, **RECEIPT}, headers=headers)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/notify", json={"user_id": "u7", **RECEIPT}, headers=headers)
    assert other.status_code == 422
