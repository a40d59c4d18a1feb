"""PUT/GET /users/<user_id>: users by the backend's own id, one person per phone and email."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from bot.extensions import db
from bot.models import ConsentEvent, Contact, Message
from tests.conftest import inbound_form, run_queue

ADA = {"phone": "+55 11 91234 5678", "email": "Ada@Example.com", "name": "Ada", "locale": "pt_br",
       "timezone": "America/Sao_Paulo", "channels": ["whatsapp", "email"]}


def test_put_creates_then_get_reads_the_normalised_user(client: FlaskClient, auth: dict) -> None:
    created = client.put("/users/123", json=ADA, headers=auth)
    assert created.status_code == 201
    user = client.get("/users/123", headers=auth).get_json()
    assert user["phone"] == "+5511912345678"
    assert user["email"] == "ada@example.com"
    assert user["locale"] == "pt-BR"
    assert user["timezone"] == "America/Sao_Paulo"
    assert user["channels"] == ["whatsapp", "email"]
    assert user["consent"] == {"whatsapp": "unknown", "email": "unknown"}


def test_omitted_fields_are_kept_and_null_clears(client: FlaskClient, auth: dict) -> None:
    client.put("/users/u-1", json=ADA, headers=auth)
    updated = client.put("/users/u-1", json={"name": "Ada L.", "email": None}, headers=auth)
    assert updated.status_code == 200
    user = updated.get_json()
    assert user["name"] == "Ada L."
    assert user["email"] is None
    assert user["phone"] == "+5511912345678"
    cleared = client.put("/users/u-1", json={"channels": None}, headers=auth).get_json()
    assert cleared["channels"] == ["whatsapp", "email"]  # the default order


def test_unknown_user_is_404_and_needs_the_token(client: FlaskClient, auth: dict) -> None:
    assert client.get("/users/nobody", headers=auth).status_code == 404
    assert client.get("/users/nobody").status_code == 401
    assert client.put("/users/nobody", json={}).status_code == 401


def test_bad_values_are_400s_naming_the_field(client: FlaskClient, auth: dict) -> None:
    cases = {
        "phone": {"phone": "12"}, "email": {"email": "not-an-address"}, "timezone": {"timezone": "Mars/Base"},
        "locale": {"locale": "xx-YY"}, "channels": {"channels": ["sms"]}, "name": {"name": 7},
    }
    for field, body in cases.items():
        answer = client.put("/users/u-2", json=body, headers=auth)
        assert answer.status_code == 400, field
        assert field in answer.get_json()["error"], (field, answer.get_json())
    assert client.put("/users/u-2", json={"channels": ["email", "email"]}, headers=auth).status_code == 400
    assert client.put("/users/u-2", json={"shoe_size": 42}, headers=auth).status_code == 400
    assert client.put("/users/" + "x" * 129, json={}, headers=auth).status_code == 400
    assert client.put("/users/u-2", data="{", headers={**auth, "Content-Type": "application/json"}).status_code == 400
    assert client.get("/users/u-2", headers=auth).status_code == 404  # nothing stored by a refusal


def test_a_phone_or_email_cannot_belong_to_two_users(client: FlaskClient, auth: dict) -> None:
    client.put("/users/a", json={"phone": "+15551230001", "email": "a@example.com"}, headers=auth)
    by_phone = client.put("/users/b", json={"phone": "+1 555 123 0001"}, headers=auth)
    assert by_phone.status_code == 409 and "phone" in by_phone.get_json()["error"]
    by_email = client.put("/users/b", json={"email": "A@EXAMPLE.COM"}, headers=auth)
    assert by_email.status_code == 409 and "email" in by_email.get_json()["error"]
    assert "a@example.com" not in by_email.get_json()["error"]  # no address in error bodies
    assert client.get("/users/b", headers=auth).status_code == 404


def test_a_whatsapp_user_who_wrote_first_becomes_the_user(app: Flask, client: FlaskClient, auth: dict,
                                                          post_webhook) -> None:
    assert post_webhook(inbound_form(from_="+15551230002", body="hi")).status_code == 200
    run_queue()
    user = client.put("/users/42", json={"phone": "+15551230002", "email": "w@example.com"}, headers=auth)
    assert user.status_code == 201
    with app.app_context():
        contacts = db.session.scalars(sa.select(Contact)).all()
        assert len(contacts) == 1 and contacts[0].user_id == "42"
        assert contacts[0].last_inbound_at is not None  # the window came along


def test_an_existing_user_absorbs_the_phone_only_contact(app: Flask, client: FlaskClient, auth: dict,
                                                         post_webhook) -> None:
    client.put("/users/7", json={"email": "seven@example.com"}, headers=auth)
    post_webhook(inbound_form(from_="+15551230003", body="STOP"))
    run_queue()
    merged = client.put("/users/7", json={"phone": "+15551230003"}, headers=auth).get_json()
    assert merged["consent"] == {"whatsapp": "opted_out", "email": "unknown"}  # STOP came with the number
    with app.app_context():
        contacts = db.session.scalars(sa.select(Contact)).all()
        assert [c.user_id for c in contacts] == ["7"]
        owner = contacts[0].id
        assert {m.contact_id for m in db.session.scalars(sa.select(Message))} == {owner}
        assert {e.contact_id for e in db.session.scalars(sa.select(ConsentEvent))} == {owner}
