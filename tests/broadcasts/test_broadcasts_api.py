"""Broadcasts over HTTP, sent through the Twilio simulator: one broadcast per Idempotency-Key,
skips counted by reason, counts after status callbacks, cancel mid-way, tags, `$user.` fields."""
from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from bot.clock import utcnow
from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from bot.models import Broadcast, Contact, Event, Message
from bot.vocabulary import Consent, EventType, Kind
from tests.conftest import CONTENT_SIDS, run_queue, status_form

TEMPLATE = {"template": "order_update", "variables": {"1": "$user.name", "2": "late opening"}}


def _users(client: FlaskClient, auth: dict, count: int, *, start: int = 0, **fields) -> list[str]:
    ids = []
    for number in range(start, start + count):
        user_id = f"user-{number}"
        body = {"phone": f"+1555200{number:04d}", "name": f"Person {number}", **fields}
        assert client.put(f"/users/{user_id}", json=body, headers=auth).status_code in (200, 201)
        ids.append(user_id)
    return ids


def _broadcast(client: FlaskClient, auth: dict, body: dict, key: str | None = None):
    headers = dict(auth, **({"Idempotency-Key": key} if key else {}))
    return client.post("/broadcasts", json=body, headers=headers)


def test_one_idempotency_key_makes_one_broadcast(app: Flask, client: FlaskClient, auth: dict,
                                                 twilio: TwilioSimulator) -> None:
    ids = _users(client, auth, 3)
    body = {"audience": {"user_ids": ids}, **TEMPLATE}
    first = _broadcast(client, auth, body, key="campaign-1")
    again = _broadcast(client, auth, body, key="campaign-1")
    assert first.status_code == again.status_code == 202, first.get_json()
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = _broadcast(client, auth, {**body, "variables": {"1": "x", "2": "y"}}, key="campaign-1")
    assert other.status_code == 422 and "different payload" in other.get_json()["error"]
    run_queue(max_tasks=500)
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Broadcast)) == 1
    assert len(twilio.messages) == 3  # each user once, not twice


def test_each_user_gets_their_own_name_and_the_counts_follow_the_callbacks(
        app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator, post_webhook) -> None:
    ids = _users(client, auth, 4)
    accepted = _broadcast(client, auth, {"audience": {"user_ids": ids}, **TEMPLATE, "metadata": {"campaign": "c"}})
    assert accepted.status_code == 202
    url = accepted.headers["Location"]
    run_queue(max_tasks=500)
    sent = twilio.messages
    assert len(sent) == 4
    by_to = {m["to"]: json.loads(m["form"]["ContentVariables"]) for m in sent}
    assert by_to == {f"whatsapp:+1555200{n:04d}": {"1": f"Person {n}", "2": "late opening"} for n in range(4)}
    assert {m["form"]["ContentSid"] for m in sent} == {CONTENT_SIDS["order_update"]}
    by_phone = {m["to"].removeprefix("whatsapp:"): m["sid"] for m in sent}
    phones = sorted(by_phone)
    post_webhook(status_form(by_phone[phones[0]], "delivered", to=phones[0]))
    post_webhook(status_form(by_phone[phones[1]], "read", to=phones[1]))
    post_webhook(status_form(by_phone[phones[2]], "undelivered", 63024, to=phones[2]))
    run_queue(max_tasks=500)
    counts = client.get(url, headers=auth).get_json()
    assert counts["state"] == "completed", counts
    assert counts["recipients"] == 4 and counts["skipped"] == {}
    assert counts["queued"] == 0 and counts["sent"] == 3 and counts["delivered"] == 2 and counts["read"] == 1
    assert counts["failed"] == {"63024": 1}
    assert counts["by_channel"]["whatsapp"]["sent"] == 3
    with app.app_context():
        events = db.session.scalars(sa.select(Event).order_by(Event.seq)).all()
        completed = [e for e in events if e.type == EventType.BROADCAST_COMPLETED]
        assert len(completed) == 1 and completed[0].data["recipients"] == 4
        assert completed[0].data["metadata"] == {"campaign": "c"}
        statuses = [e for e in events if e.type == EventType.MESSAGE_STATUS]
        assert statuses and all(e.data["broadcast_id"] == accepted.get_json()["id"] for e in statuses)
        assert {m.kind for m in db.session.scalars(sa.select(Message))} == {Kind.BROADCAST}


def test_opted_out_handoff_duplicates_unknown_and_missing_fields_are_skipped_and_counted(
        app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator) -> None:
    ids = _users(client, auth, 6)
    client.put("/users/nameless", json={"phone": "+15552009999"}, headers=auth)
    with app.app_context():
        contacts = {c.user_id: c for c in db.session.scalars(sa.select(Contact))}
        contacts["user-0"].consent = Consent.OPTED_OUT
        contacts["user-1"].handoff_until = utcnow() + timedelta(hours=1)
        db.session.commit()
    audience = {"user_ids": [*ids, "user-2", "nobody", "nameless"],
                "phones": ["+15552000003", "+1 555 200 0004", "+999123"]}
    accepted = _broadcast(client, auth, {"audience": audience, **TEMPLATE})
    assert accepted.status_code == 202, accepted.get_json()
    run_queue(max_tasks=500)
    counts = client.get(accepted.headers["Location"], headers=auth).get_json()
    assert counts["skipped"] == {"opted_out": 1, "handoff": 1, "duplicate": 3, "unknown_user": 1,
                                 "missing_user_field": 1, "invalid_phone": 1}
    assert counts["recipients"] == 4 and counts["sent"] == 4
    sent_to = sorted(m["to"] for m in twilio.messages)
    assert sent_to == [f"whatsapp:+1555200000{n}" for n in (2, 3, 4, 5)]


def test_tags_choose_the_audience(app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator) -> None:
    _users(client, auth, 3, tags=["VIP", "beta"])
    _users(client, auth, 2, start=10, tags=["other"])
    assert client.get("/users/user-0", headers=auth).get_json()["tags"] == ["beta", "vip"]
    accepted = _broadcast(client, auth, {"audience": {"tags": ["vip"], "user_ids": ["user-1", "user-10"]}, **TEMPLATE})
    run_queue(max_tasks=500)
    counts = client.get(accepted.headers["Location"], headers=auth).get_json()
    assert counts["recipients"] == 4 and counts["skipped"] == {"duplicate": 1}
    assert len(twilio.messages) == 4


def test_cancel_mid_way_stops_it(app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator) -> None:
    app.config.update(SEND_BATCH=1, TWILIO_MESSAGES_PER_SECOND=1, BROADCAST_BATCH=10)  # a window of one message
    ids = _users(client, auth, 30)
    accepted = _broadcast(client, auth, {"audience": {"user_ids": ids}, **TEMPLATE})
    url = accepted.headers["Location"]
    for _ in range(100):  # a task at a time until a few have left: mid-way
        try:
            run_queue(max_tasks=1)
        except AssertionError:
            pass  # still busy, as wanted
        if len(twilio.messages) >= 3:
            break
    canceled = client.post(url + "/cancel", headers=auth)
    assert canceled.status_code == 200, canceled.get_json()
    left = len(twilio.messages)
    assert 0 < left < 30 and canceled.get_json()["state"] == "canceled"
    run_queue(max_tasks=500)
    assert len(twilio.messages) == left  # nothing more leaves
    counts = client.get(url, headers=auth).get_json()
    assert counts["state"] == "canceled" and counts["sent"] == left and counts["queued"] == 0
    assert counts["recipients"] <= 30
    assert client.post(url + "/cancel", headers=auth).status_code == 200  # twice is harmless


def test_bad_input_is_a_4xx_with_an_error(client: FlaskClient, auth: dict) -> None:
    cases = [
        ({"audience": {}, **TEMPLATE}, "names nobody"),
        ({"audience": {"user_ids": ["a"]}}, "either 'template'"),
        ({"audience": {"user_ids": ["a"]}, "template": "nope"}, "unknown template"),
        ({"audience": {"user_ids": ["a"]}, **TEMPLATE, "send_at": "2020-01-01T00:00:00Z"}, "in the past"),
        ({"audience": {"user_ids": ["a"]}, **TEMPLATE, "send_at": "2999-01-01T00:00:00+00:00"}, "35 days"),
        ({"audience": {"user_ids": ["a"]}, **TEMPLATE, "send_at": "2026-12-24T09:00:00"}, "offset"),
        ({"audience": {"phones": ["12345"]}, **TEMPLATE}, "international"),
        ({"audience": {"tags": ["no spaces"]}, **TEMPLATE}, "tag"),
        ({"audience": {"user_ids": ["a"]}, "template": "order_update", "variables": {"1": "$user.password"}},
         "names no user field"),
        ({"audience": {"user_ids": ["a"] * 100_001}, **TEMPLATE}, "100,000"),
        ({"audience": {"user_ids": ["a"]}, **TEMPLATE, "extra": 1}, "unknown field"),
    ]
    for body, words in cases:
        answer = client.post("/broadcasts", json=body, headers=auth)
        assert answer.status_code == 400, (body, answer.get_json())
        assert words in answer.get_json()["error"], (words, answer.get_json())
    assert client.post("/broadcasts", data="x", headers=auth).status_code == 415
    assert client.post("/broadcasts", json=TEMPLATE).status_code == 401
    assert client.get("/broadcasts/" + "0" * 32, headers=auth).status_code == 404
    assert client.get("/broadcasts/nope", headers=auth).get_json()["error"]
    assert client.put("/users/u", json={"tags": ["a b"]}, headers=auth).status_code == 400
    assert client.put("/users/u", json={"tags": [f"t{n}" for n in range(51)]}, headers=auth).status_code == 400


def test_a_broadcast_whose_queue_was_flushed_is_taken_up_again_by_the_sweep(
        app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator) -> None:
    """Everything a broadcast needs is in the database: with its queued turn lost (a Redis
    flush), the minute sweep starts its pump again and it completes, each user messaged once."""
    from bot.broadcasts import pump
    from bot.delivery.queue import huey

    ids = _users(client, auth, 5)
    accepted = _broadcast(client, auth, {"audience": {"user_ids": ids}, **TEMPLATE})
    huey.flush()  # the pump's first turn is gone
    run_queue()
    assert twilio.messages == []
    with app.app_context():
        assert pump.sweep() == 0  # never turned: its chain may still be on its way...
        broadcast = db.session.get(Broadcast, accepted.get_json()["id"])
        broadcast.created_at = utcnow() - pump.LOST_AFTER - timedelta(seconds=1)  # ...until it is late
        db.session.commit()
        assert pump.sweep() == 1
    run_queue(max_tasks=500)
    assert sorted(m["to"] for m in twilio.messages) == [f"whatsapp:+1555200{n:04d}" for n in range(5)]
    assert client.get(accepted.headers["Location"], headers=auth).get_json()["state"] == "completed"


def test_a_completed_broadcast_cannot_be_canceled_and_its_messages_name_it(
        app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator) -> None:
    ids = _users(client, auth, 2)
    accepted = _broadcast(client, auth, {"audience": {"user_ids": ids}, **TEMPLATE})
    run_queue(max_tasks=500)
    url = accepted.headers["Location"]
    assert client.get(url, headers=auth).get_json()["state"] == "completed"
    refused = client.post(url + "/cancel", headers=auth)
    assert refused.status_code == 409 and "completed" in refused.get_json()["error"]
    with app.app_context():
        message_id = db.session.scalar(sa.select(Message.id).limit(1))
    message = client.get(f"/messages/{message_id}", headers=auth).get_json()
    assert message["broadcast_id"] == accepted.get_json()["id"] and message["kind"] == "broadcast"


def test_a_formatted_number_is_stored_compact_and_one_too_long_for_e164_is_a_400(
        app: Flask, client: FlaskClient, auth: dict, twilio: TwilioSimulator) -> None:
    # 25 characters as listed: wider than broadcast_targets.phone, which once made this a 500
    # on PostgreSQL.
    _users(client, auth, 2, start=42)
    formatted = "whatsapp: +1 (555) 200-0042"
    accepted = _broadcast(client, auth, {"audience": {"phones": [formatted, "0015552000043"]}, **TEMPLATE})
    assert accepted.status_code == 202, accepted.get_json()
    run_queue(max_tasks=500)
    assert sorted(m["to"] for m in twilio.messages) == ["whatsapp:+15552000042", "whatsapp:+15552000043"]
    too_long = _broadcast(client, auth, {"audience": {"phones": ["+1 555 200 0042 0000 0"]}, **TEMPLATE})
    assert too_long.status_code == 400
    assert "'audience.phones'[0]" in too_long.get_json()["error"]
