"""POST /notify and GET /messages/<id> as a backend meets them over HTTP (docs/ARCHITECTURE.md, "HTTP contract")."""
from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlparse

import pytest
import sqlalchemy as sa

from bot.config import MAX_CONTENT_LENGTH
from bot.extensions import db
from bot.models import Message
from tests.conftest import API_TOKEN, AUTH_TOKEN, make_contact, run_queue, status_form

PHONE = "+15551234567"
#: A wrong token of the real token's length (compare_digest must not be fooled by equal lengths).
WRONG_TOKEN = API_TOKEN[:-1] + ("y" if API_TOKEN[-1] != "y" else "z")
TEMPLATE = "order_update"


# ---------------------------------------------------------------- helpers


def post_notify(client, auth, payload=None, **kwargs):
    headers = {**auth, **kwargs.pop("headers", {})}
    if payload is not None:
        kwargs["json"] = payload
    return client.post("/notify", headers=headers, **kwargs)


def error_of(response) -> str:
    """The JSON `error` text of an error answer (asserting the answer is JSON, not HTML)."""
    assert response.is_json, (response.status_code, response.content_type, response.get_data(as_text=True)[:200])
    data = response.get_json()
    assert isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"], data
    return data["error"]


def message_count(app) -> int:
    with app.app_context():
        db.session.expire_all()
        return db.session.scalar(sa.select(sa.func.count()).select_from(Message))


@pytest.fixture
def contact(app):
    """A contact who wrote 5 minutes ago: free-form messages are allowed."""
    with app.app_context():
        make_contact(PHONE)
    return PHONE


def accepted(client, auth, payload, **kwargs) -> dict:
    response = post_notify(client, auth, payload, **kwargs)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


# ---------------------------------------------------------------- authentication


BAD_AUTH = [
    pytest.param({}, id="no-header"),
    pytest.param({"Authorization": f"Bearer {WRONG_TOKEN}"}, id="wrong-token-same-length"),
    pytest.param({"Authorization": "Basic " + "dXNlcjpwYXNz"}, id="basic-scheme"),
    pytest.param({"Authorization": f"Basic {API_TOKEN}"}, id="basic-scheme-real-token"),
    pytest.param({"Authorization": f"Bearer {API_TOKEN}x"}, id="longer-token"),
    pytest.param({"Authorization": f"Bearer {API_TOKEN[:-1]}"}, id="shorter-token"),
    pytest.param({"Authorization": "Bearer "}, id="empty-token"),
    pytest.param({"Authorization": API_TOKEN}, id="token-without-scheme"),
]


@pytest.mark.parametrize("headers", BAD_AUTH)
def test_notify_without_valid_token_is_401(app, client, contact, headers):
    assert len(WRONG_TOKEN) == len(API_TOKEN) and WRONG_TOKEN != API_TOKEN
    response = client.post("/notify", json={"to": PHONE, "body": "hi"}, headers=headers)
    assert response.status_code == 401
    assert "token" in error_of(response).lower()
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert message_count(app) == 0
    assert run_queue() == 0


@pytest.mark.parametrize("headers", BAD_AUTH)
def test_get_message_needs_the_token(app, client, auth, contact, headers):
    message_id = accepted(client, auth, {"to": PHONE, "body": "hi"})["id"]
    response = client.get(f"/messages/{message_id}", headers=headers)
    assert response.status_code == 401
    assert "token" in error_of(response).lower()
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    body = response.get_data(as_text=True)
    assert message_id not in body and PHONE not in body  # nothing about the message leaks


def test_get_unknown_message_needs_the_token_too(client):
    """Authentication comes before the lookup: a 404 would tell a stranger which ids exist."""
    response = client.get("/messages/" + "0" * 32)
    assert response.status_code == 401
    error_of(response)


@pytest.mark.parametrize("headers", BAD_AUTH)
def test_401_never_reveals_secrets(client, headers):
    response = client.post("/notify", json={"to": PHONE, "body": "hi"}, headers=headers)
    assert response.status_code == 401
    text = response.get_data(as_text=True) + " ".join(f"{k}: {v}" for k, v in response.headers.items())
    assert API_TOKEN not in text
    assert AUTH_TOKEN not in text
    assert WRONG_TOKEN not in text  # nor the token the caller sent


# ---------------------------------------------------------------- request framing


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"data": {"to": PHONE, "body": "hi"}}, id="form-encoded"),
        pytest.param({"data": json.dumps({"to": PHONE, "body": "hi"}), "content_type": "text/plain"}, id="text-plain"),
        pytest.param({"data": json.dumps({"to": PHONE, "body": "hi"})}, id="no-content-type"),
    ],
)
def test_non_json_content_type_is_415(app, client, auth, contact, kwargs):
    response = post_notify(client, auth, **kwargs)
    assert response.status_code == 415
    assert "application/json" in error_of(response)
    assert message_count(app) == 0


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"to": "+15551234567", "body": ', id="truncated"),
        pytest.param("{'to': '+15551234567'}", id="single-quotes"),
        pytest.param("", id="empty"),
        pytest.param("not json at all", id="text"),
    ],
)
def test_malformed_json_is_400(app, client, auth, contact, raw):
    response = post_notify(client, auth, data=raw, content_type="application/json")
    assert response.status_code == 400
    assert "json" in error_of(response).lower()
    assert message_count(app) == 0


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param([{"to": PHONE, "body": "hi"}], id="list"),
        pytest.param("to=+15551234567", id="string"),
        pytest.param(42, id="number"),
        pytest.param(True, id="bool"),
    ],
)
def test_json_that_is_not_an_object_is_400(app, client, auth, contact, payload):
    response = post_notify(client, auth, data=json.dumps(payload), content_type="application/json")
    assert response.status_code == 400
    assert "object" in error_of(response)
    assert message_count(app) == 0


def test_json_null_is_400(client, auth, contact):
    response = post_notify(client, auth, data="null", content_type="application/json")
    assert response.status_code == 400
    error_of(response)


def test_unknown_field_is_400_naming_it(app, client, auth, contact):
    response = post_notify(client, auth, {"to": PHONE, "boddy": "hi"})
    assert response.status_code == 400
    error = error_of(response)
    assert "boddy" in error
    assert "body" in error.replace("boddy", "")  # says what is allowed
    assert message_count(app) == 0


def test_unknown_field_next_to_a_valid_body_is_still_400(client, auth, contact):
    response = post_notify(client, auth, {"to": PHONE, "body": "hi", "priority": "high"})
    assert response.status_code == 400
    assert "priority" in error_of(response)


def test_body_over_max_content_length_is_413_json(app, client, auth, contact):
    big = {"to": PHONE, "body": "x" * (MAX_CONTENT_LENGTH + 10)}
    response = post_notify(client, auth, big)
    assert response.status_code == 413
    error_of(response)  # JSON with an error, not Werkzeug's HTML page
    assert "<html" not in response.get_data(as_text=True).lower()
    assert message_count(app) == 0


# ---------------------------------------------------------------- `to`


@pytest.mark.parametrize(
    "payload, fragment",
    [
        pytest.param({"body": "hi"}, "required", id="missing"),
        pytest.param({"to": 15551234567, "body": "hi"}, "string", id="integer"),
        pytest.param({"to": None, "body": "hi"}, "string", id="null"),
        pytest.param({"to": ["+15551234567"], "body": "hi"}, "string", id="list"),
        pytest.param({"to": "abc", "body": "hi"}, "", id="letters"),
        pytest.param({"to": "+abc", "body": "hi"}, "", id="plus-letters"),
        pytest.param({"to": "", "body": "hi"}, "", id="empty"),
        pytest.param({"to": "+1555", "body": "hi"}, "", id="too-short"),
        pytest.param({"to": "+1555123456789012345", "body": "hi"}, "", id="too-long"),
        pytest.param({"to": "15551234567", "body": "hi"}, "+", id="no-plus"),
        pytest.param({"to": "whatsapp:15551234567", "body": "hi"}, "+", id="prefix-no-plus"),
    ],
)
def test_bad_to_is_400_mentioning_to(app, client, auth, contact, payload, fragment):
    response = post_notify(client, auth, payload)
    assert response.status_code == 400
    error = error_of(response)
    assert "'to'" in error
    assert fragment in error
    assert message_count(app) == 0


@pytest.mark.parametrize(
    "raw, e164",
    [
        pytest.param("whatsapp:+1 555 123 4567", "+15551234567", id="whatsapp-prefix-spaces"),
        pytest.param("00447911123456", "+447911123456", id="double-zero"),
        pytest.param("+1 (555) 123-4567", "+15551234567", id="punctuation"),
    ],
)
def test_to_is_normalised_to_e164(app, client, auth, raw, e164):
    with app.app_context():
        make_contact(e164)
    data = accepted(client, auth, {"to": raw, "body": "hi"})
    assert data["to"] == e164
    got = client.get(f"/messages/{data['id']}", headers=auth).get_json()
    assert got["to"] == e164


# ---------------------------------------------------------------- body, template, variables, media


@pytest.mark.parametrize(
    "body, fragment",
    [
        pytest.param("", "non-empty", id="empty"),
        pytest.param("   \n\t", "non-empty", id="whitespace"),
        pytest.param(42, "string", id="number"),
        pytest.param(["hi"], "string", id="list"),
        pytest.param({"text": "hi"}, "string", id="object"),
        pytest.param("x" * 1601, "1600", id="1601-chars"),
    ],
)
def test_bad_body_is_400(app, client, auth, contact, body, fragment):
    response = post_notify(client, auth, {"to": PHONE, "body": body})
    assert response.status_code == 400
    error = error_of(response)
    assert "'body'" in error
    assert fragment in error
    assert message_count(app) == 0


def test_body_of_exactly_1600_chars_is_accepted(app, client, auth, contact):
    data = accepted(client, auth, {"to": PHONE, "body": "é" * 1600})  # characters, not bytes
    got = client.get(f"/messages/{data['id']}", headers=auth).get_json()
    assert got["body"] == "é" * 1600


def test_neither_body_nor_template_is_400(client, auth, contact):
    response = post_notify(client, auth, {"to": PHONE})
    assert response.status_code == 400
    error = error_of(response)
    assert "'body'" in error and "'template'" in error


@pytest.mark.parametrize(
    "extra, fragments",
    [
        pytest.param({"body": "hi", "template": TEMPLATE}, ("'template'", "'body'"), id="body-and-template"),
        pytest.param({"media_url": "https://example.com/a.jpg", "template": TEMPLATE}, ("'template'", "'media_url'"),
                     id="media-and-template"),
        pytest.param({"body": "hi", "variables": {"1": "Ada"}}, ("'variables'", "'template'"),
                     id="variables-without-template"),
        pytest.param({"template": "shipping_notice"}, ("shipping_notice", TEMPLATE), id="unknown-template"),
        pytest.param({"template": ""}, ("'template'",), id="empty-template"),
        pytest.param({"template": 7}, ("'template'",), id="template-not-string"),
        pytest.param({"template": TEMPLATE, "variables": ["Ada"]}, ("'variables'", "object"), id="variables-list"),
        pytest.param({"template": TEMPLATE, "variables": "Ada"}, ("'variables'", "object"), id="variables-string"),
        pytest.param({"template": TEMPLATE, "variables": {"1": {"name": "Ada"}}}, ("variable", "'1'"),
                     id="variables-nested-object"),
        pytest.param({"template": TEMPLATE, "variables": {"1": ["Ada"]}}, ("variable", "'1'"),
                     id="variables-nested-list"),
        pytest.param({"template": TEMPLATE, "variables": {"1": None}}, ("variable", "'1'"), id="variables-null-value"),
        pytest.param({"template": TEMPLATE, "variables": {"1": True}}, ("variable", "'1'"), id="variables-bool-value"),
        pytest.param({"template": TEMPLATE, "variables": {"1": "x" * 1025}}, ("'variables'", "1024"),
                     id="variables-too-long"),
        pytest.param({"media_url": "ftp://example.com/a.jpg"}, ("'media_url'", "http"), id="media-ftp"),
        pytest.param({"media_url": "javascript:alert(1)"}, ("'media_url'",), id="media-javascript"),
        pytest.param({"media_url": "example.com/a.jpg"}, ("'media_url'",), id="media-no-scheme"),
        pytest.param({"media_url": "https://"}, ("'media_url'",), id="media-no-host"),
        pytest.param({"media_url": 5}, ("'media_url'",), id="media-number"),
        pytest.param({"media_url": ["https://example.com/a.jpg", "https://example.com/b.jpg"]}, ("'media_url'", "one"),
                     id="media-list-of-2"),
        pytest.param({"media_url": []}, ("'media_url'",), id="media-empty-list"),
    ],
)
def test_bad_content_is_400(app, client, auth, contact, extra, fragments):
    response = post_notify(client, auth, {"to": PHONE, **extra})
    assert response.status_code == 400
    error = error_of(response)
    for fragment in fragments:
        assert fragment in error
    assert message_count(app) == 0
    assert run_queue() == 0


def test_unknown_template_lists_the_known_ones(client, auth, contact):
    response = post_notify(client, auth, {"to": PHONE, "template": "order_updte"})
    assert response.status_code == 400
    error = error_of(response)
    assert "order_updte" in error
    assert TEMPLATE in error.replace("order_updte", "")


def test_media_url_alone_within_the_window_is_accepted(app, client, auth, contact, twilio):
    data = accepted(client, auth, {"to": PHONE, "media_url": "https://example.com/receipt.pdf"})
    got = client.get(f"/messages/{data['id']}", headers=auth).get_json()
    assert got["media_urls"] == ["https://example.com/receipt.pdf"]
    assert got["body"] is None
    assert run_queue() == 1
    assert len(twilio.messages) == 1


def test_media_url_as_a_list_of_one_is_accepted(client, auth, contact):
    data = accepted(client, auth, {"to": PHONE, "body": "your receipt", "media_url": ["https://example.com/r.pdf"]})
    got = client.get(f"/messages/{data['id']}", headers=auth).get_json()
    assert got["media_urls"] == ["https://example.com/r.pdf"]


def test_template_with_numeric_variables_is_accepted(client, auth, contact):
    data = accepted(client, auth, {"to": PHONE, "template": TEMPLATE, "variables": {"1": "Ada", "2": 42}})
    got = client.get(f"/messages/{data['id']}", headers=auth).get_json()
    assert got["template"] == TEMPLATE
    assert got["variables"] == {"1": "Ada", "2": "42"}


# ---------------------------------------------------------------- consent: 409


@pytest.mark.parametrize(
    "inbound_ago",
    [pytest.param(timedelta(minutes=5), id="inside-window"),
     pytest.param(timedelta(hours=25), id="outside-window"),
     pytest.param(None, id="never-wrote")],
)
@pytest.mark.parametrize(
    "content",
    [pytest.param({"body": "hi"}, id="text"),
     pytest.param({"media_url": "https://example.com/a.jpg"}, id="media"),
     pytest.param({"template": TEMPLATE, "variables": {"1": "Ada"}}, id="template")],
)
def test_opted_out_contact_is_409(app, client, auth, twilio, inbound_ago, content):
    with app.app_context():
        make_contact(PHONE, inbound_ago=inbound_ago, consent="opted_out")
    response = post_notify(client, auth, {"to": "whatsapp:" + PHONE, **content})
    assert response.status_code == 409
    error = error_of(response)
    assert "opted out" in error
    assert message_count(app) == 0
    assert run_queue() == 0
    assert twilio.messages == []


def test_opted_out_409_is_not_stored_under_an_idempotency_key(app, client, auth):
    """A refused request creates no row, so the key stays free (and the answer stays 409)."""
    with app.app_context():
        make_contact(PHONE, consent="opted_out")
    for _ in range(2):
        response = post_notify(client, auth, {"to": PHONE, "body": "hi"}, headers={"Idempotency-Key": "k-409"})
        assert response.status_code == 409
    assert message_count(app) == 0


# ---------------------------------------------------------------- the 24-hour window: 422


@pytest.mark.parametrize(
    "inbound_ago",
    [pytest.param(None, id="never-wrote"),
     pytest.param(timedelta(hours=25), id="wrote-25h-ago"),
     pytest.param(timedelta(hours=24, minutes=1), id="wrote-24h01-ago")],
)
@pytest.mark.parametrize(
    "content",
    [pytest.param({"body": "hi"}, id="text"), pytest.param({"media_url": "https://example.com/a.jpg"}, id="media")],
)
def test_free_form_outside_the_window_is_422(app, client, auth, twilio, inbound_ago, content):
    with app.app_context():
        make_contact(PHONE, inbound_ago=inbound_ago)
    response = post_notify(client, auth, {"to": PHONE, **content})
    assert response.status_code == 422
    assert "template" in error_of(response)
    assert response.get_json()["templates"] == [TEMPLATE]
    assert message_count(app) == 0
    assert run_queue() == 0

    data = accepted(client, auth, {"to": PHONE, "template": TEMPLATE, "variables": {"1": "Ada"}})
    assert data["status"] == "pending"
    assert message_count(app) == 1
    assert run_queue() == 1
    assert len(twilio.messages) == 1


def test_wrote_23h_ago_is_still_inside_the_window(app, client, auth):
    with app.app_context():
        make_contact(PHONE, inbound_ago=timedelta(hours=23))
    accepted(client, auth, {"to": PHONE, "body": "hi"})


def test_brand_new_number_with_free_form_text_is_422(app, client, auth):
    response = post_notify(client, auth, {"to": "+15557654321", "body": "hi"})
    assert response.status_code == 422
    assert "template" in error_of(response)
    assert response.get_json()["templates"] == [TEMPLATE]
    assert message_count(app) == 0
    assert run_queue() == 0


def test_brand_new_number_with_a_template_is_accepted(app, client, auth, twilio):
    data = accepted(client, auth, {"to": "+15557654321", "template": TEMPLATE})
    assert data["to"] == "+15557654321"
    assert run_queue() == 1
    assert len(twilio.messages) == 1


# ---------------------------------------------------------------- 202 and GET /messages/<id>


def test_202_shape_and_location(app, client, auth, contact):
    response = post_notify(client, auth, {"to": "whatsapp:" + PHONE, "body": "Your order shipped"})
    assert response.status_code == 202
    assert response.is_json
    data = response.get_json()
    assert isinstance(data["id"], str) and data["id"]
    assert data["status"] == "pending"
    assert data["to"] == PHONE
    assert "Idempotent-Replayed" not in response.headers
    location = response.headers["Location"]
    assert urlparse(location).path == f"/messages/{data['id']}"

    got = client.get(urlparse(location).path, headers=auth)
    assert got.status_code == 200
    message = got.get_json()
    assert message["id"] == data["id"]
    assert message["to"] == PHONE
    assert message["status"] == "pending"
    assert message["error_code"] is None
    assert message["events"] == []
    assert message["body"] == "Your order shipped"


def test_each_notify_gets_its_own_id(client, auth, contact):
    first = accepted(client, auth, {"to": PHONE, "body": "hi"})
    second = accepted(client, auth, {"to": PHONE, "body": "hi"})
    assert first["id"] != second["id"]


def test_get_unknown_message_is_404_json(client, auth):
    response = client.get("/messages/does-not-exist", headers=auth)
    assert response.status_code == 404
    assert "does-not-exist" in error_of(response)


def test_get_message_follows_status_callbacks(app, client, auth, contact, twilio, post_webhook):
    message_id = accepted(client, auth, {"to": PHONE, "body": "hi"})["id"]
    assert run_queue() == 1
    [sent] = twilio.messages
    sid = sent["sid"]

    assert post_webhook(status_form(sid, "sent")).status_code == 200
    assert post_webhook(status_form(sid, "delivered")).status_code == 200

    response = client.get(f"/messages/{message_id}", headers=auth)
    assert response.status_code == 200
    message = response.get_json()
    assert message["status"] == "delivered"
    assert message["twilio_sid"] == sid
    assert message["error_code"] is None
    assert [event["status"] for event in message["events"]] == ["sent", "delivered"]
    assert all(event["error_code"] is None for event in message["events"])


def test_late_sent_callback_does_not_move_delivered_back(client, auth, contact, twilio, post_webhook):
    message_id = accepted(client, auth, {"to": PHONE, "body": "hi"})["id"]
    run_queue()
    sid = twilio.messages[0]["sid"]
    post_webhook(status_form(sid, "delivered"))
    post_webhook(status_form(sid, "sent"))  # callbacks arrive out of order
    message = client.get(f"/messages/{message_id}", headers=auth).get_json()
    assert message["status"] == "delivered"
    assert [event["status"] for event in message["events"]] == ["delivered", "sent"]


def test_failed_callback_shows_its_error_code(app, client, auth, contact, twilio, post_webhook):
    ok_id = accepted(client, auth, {"to": PHONE, "body": "first"})["id"]
    failed_id = accepted(client, auth, {"to": PHONE, "body": "second"})["id"]
    assert run_queue() == 2
    sids = {m["body"]: m["sid"] for m in twilio.messages}
    post_webhook(status_form(sids["first"], "delivered"))
    post_webhook(status_form(sids["second"], "failed", error_code=63016))

    failed = client.get(f"/messages/{failed_id}", headers=auth).get_json()
    assert failed["status"] == "failed"
    assert failed["error_code"] == 63016
    assert failed["events"][-1]["status"] == "failed"
    assert failed["events"][-1]["error_code"] == 63016

    ok = client.get(f"/messages/{ok_id}", headers=auth).get_json()
    assert ok["status"] == "delivered"
    assert ok["error_code"] is None


# ---------------------------------------------------------------- Idempotency-Key


def test_same_key_same_payload_is_replayed(app, client, auth, contact, twilio):
    payload = {"to": PHONE, "body": "Your order shipped"}
    key = {"Idempotency-Key": "order-42-shipped"}
    first = post_notify(client, auth, payload, headers=key)
    second = post_notify(client, auth, payload, headers=key)
    assert first.status_code == 202 and second.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"]
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert second.headers["Location"] == first.headers["Location"]
    assert message_count(app) == 1
    assert run_queue() == 1
    assert len(twilio.messages) == 1


def test_same_key_different_payload_is_422(app, client, auth, contact, twilio):
    key = {"Idempotency-Key": "order-42"}
    first = post_notify(client, auth, {"to": PHONE, "body": "Your order shipped"}, headers=key)
    assert first.status_code == 202
    second = post_notify(client, auth, {"to": PHONE, "body": "Your order was cancelled"}, headers=key)
    assert second.status_code == 422
    assert "Idempotency-Key" in error_of(second)
    assert "Idempotent-Replayed" not in second.headers
    assert message_count(app) == 1
    assert run_queue() == 1
    assert len(twilio.messages) == 1


def test_same_key_for_another_recipient_is_422(app, client, auth, contact):
    with app.app_context():
        make_contact("+15557654321")
    key = {"Idempotency-Key": "k-1"}
    assert post_notify(client, auth, {"to": PHONE, "body": "hi"}, headers=key).status_code == 202
    response = post_notify(client, auth, {"to": "+15557654321", "body": "hi"}, headers=key)
    assert response.status_code == 422
    assert "Idempotency-Key" in error_of(response)
    assert message_count(app) == 1


def test_equivalent_payload_with_another_spelling_of_the_number_is_a_replay(app, client, auth, contact, twilio):
    key = {"Idempotency-Key": "spelling"}
    first = post_notify(client, auth, {"to": "whatsapp:+15551234567", "body": "hi"}, headers=key)
    second = post_notify(client, auth, {"to": "+15551234567", "body": "hi"}, headers=key)
    third = post_notify(client, auth, {"body": "hi", "to": "+1 555 123 4567"}, headers=key)
    assert first.status_code == second.status_code == third.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"] == third.get_json()["id"]
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert third.headers.get("Idempotent-Replayed") == "true"
    assert message_count(app) == 1
    assert run_queue() == 1
    assert len(twilio.messages) == 1


@pytest.mark.parametrize(
    "key",
    [pytest.param("", id="empty"), pytest.param("   ", id="blank"), pytest.param("k" * 256, id="256-chars")],
)
def test_bad_idempotency_key_is_400(app, client, auth, contact, key):
    response = post_notify(client, auth, {"to": PHONE, "body": "hi"}, headers={"Idempotency-Key": key})
    assert response.status_code == 400
    error = error_of(response)
    assert "Idempotency-Key" in error
    assert "255" in error
    assert message_count(app) == 0
    assert run_queue() == 0


def test_idempotency_key_of_255_chars_is_accepted(app, client, auth, contact):
    key = {"Idempotency-Key": "k" * 255}
    first = accepted(client, auth, {"to": PHONE, "body": "hi"}, headers=key)
    second = post_notify(client, auth, {"to": PHONE, "body": "hi"}, headers=key)
    assert second.status_code == 202
    assert second.get_json()["id"] == first["id"]
    assert message_count(app) == 1


def test_replay_after_sending_shows_the_current_status(app, client, auth, contact, twilio, post_webhook):
    payload = {"to": PHONE, "body": "hi"}
    key = {"Idempotency-Key": "after-send"}
    first = accepted(client, auth, payload, headers=key)
    assert first["status"] == "pending"
    assert run_queue() == 1

    current = client.get(f"/messages/{first['id']}", headers=auth).get_json()
    assert current["status"] != "pending"
    replay = post_notify(client, auth, payload, headers=key)
    assert replay.status_code == 202
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.get_json()["id"] == first["id"]
    assert replay.get_json()["status"] == current["status"]

    post_webhook(status_form(twilio.messages[0]["sid"], "delivered"))
    replay = post_notify(client, auth, payload, headers=key)
    assert replay.get_json()["status"] == "delivered"
    assert run_queue() == 0
    assert len(twilio.messages) == 1


def test_keys_are_independent(app, client, auth, contact, twilio):
    payload = {"to": PHONE, "body": "hi"}
    a = accepted(client, auth, payload, headers={"Idempotency-Key": "a"})
    b = accepted(client, auth, payload, headers={"Idempotency-Key": "b"})
    assert a["id"] != b["id"]
    assert message_count(app) == 2
    assert run_queue() == 2
    assert len(twilio.messages) == 2


# ------------------------------------------- what JSON allows but no message or database holds


@pytest.mark.parametrize("raw, where", [
    ('{"to": "+15551234567", "body": "a\\u0000b"}', "NUL"),
    ('{"to": "+15551234567", "body": "hi \\ud800"}', "surrogate"),
    ('{"to": "+15551234567", "flow": "feedback", "variables": {"topic": NaN}}', "finite"),
    ('{"to": "+15551234567", "flow": "feedback", "variables": {"topic": Infinity}}', "finite"),
    ('{"to": "+15551234567", "template": "order_update", "variables": {"1": -Infinity}}', "finite"),
    ('{"to": "+15551234567", "flow": "appointment", "variables": {"date": "a\\u0000", "time": "9"}}', "NUL"),
])
def test_unstorable_json_values_are_a_400_not_a_500(app, client, auth, raw, where):
    with app.app_context():
        make_contact(PHONE)
    response = post_notify(client, auth, data=raw, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert where in error_of(response)
    assert message_count(app) == 0


def test_absurdly_deep_json_is_a_400(app, client, auth):
    response = post_notify(client, auth, data="[" * 100000 + "]" * 100000, content_type="application/json")
    assert response.status_code == 400 and "not valid JSON" in error_of(response)


def test_over_long_flow_variables_are_a_400(app, client, auth):
    with app.app_context():
        make_contact(PHONE)
    response = post_notify(client, auth, {"to": PHONE, "flow": "appointment",
                                          "variables": {"date": "x" * 3000, "time": "10:00"}})
    assert response.status_code == 400 and "'date'" in error_of(response)


def test_a_reply_rendered_too_long_is_recorded_not_sent(app, twilio):
    from bot.models import Contact
    from bot.conversations.replies import build_messages
    from bot.channels.whatsapp.errors import TOO_LONG_CODE
    from flows.toolkit import Reply

    with app.app_context():
        contact = make_contact(PHONE)
        [row] = build_messages([Reply("appointment/reminder", {"date": "d" * 1000, "time": "t" * 1000, "name": None,
                                                               "place": None})], db.session.get(Contact, contact.id))
        assert (row.status, row.error_code) == ("failed", TOO_LONG_CODE)
        assert "characters" in row.error_message
