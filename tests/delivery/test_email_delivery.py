"""Email end to end in process: /notify by user -> the worker sends through SendGrid's SDK to the
simulator -> SendGrid's signed events come back -> statuses, consent and the one fallback."""
from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from bot.clock import utcnow
from bot.conversations.users import find_user
from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from bot.models import ConsentEvent, Event, Message
from tests.conftest import run_queue, status_form

RECEIPT = {"subject": "Your receipt", "body": "Thanks for your order"}


def _post_events(client: FlaskClient, twilio: TwilioSimulator, events: list[dict], *, sign_body: bytes | None = None):
    body = json.dumps(events).encode()
    headers = twilio.sendgrid.signed_headers(sign_body if sign_body is not None else body)
    return client.post("/sendgrid/events", data=body, headers=headers)


def _email_user(client: FlaskClient, auth: dict, user_id: str = "u1", **fields) -> None:
    body = {"email": "ada@example.com", "name": "Ada", "channels": ["email"], **fields}
    assert client.put(f"/users/{user_id}", json=body, headers=auth).status_code in (200, 201)


def test_an_email_is_sent_with_our_id_and_a_one_click_unsubscribe(client, auth, twilio) -> None:
    _email_user(client, auth)
    accepted = client.post("/notify", json={"user_id": "u1", **RECEIPT}, headers=auth).get_json()
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["to"] == "ada@example.com" and email["subject"] == "Your receipt"
    assert email["custom_args"] == {"message_id": accepted["id"]}
    assert email["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    message = client.get(accepted["url"], headers=auth).get_json()
    assert message["status"] == "accepted" and message["provider_message_id"]


def test_events_move_the_status_up_once_each(app, client, auth, twilio) -> None:
    _email_user(client, auth)
    accepted = client.post("/notify", json={"user_id": "u1", **RECEIPT}, headers=auth).get_json()
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    batch = [twilio.sendgrid.event(email, "processed"), twilio.sendgrid.event(email, "open"),
             twilio.sendgrid.event(email, "delivered")]
    answers = [_post_events(client, twilio, batch).get_json() for _ in range(3)]
    assert answers[0]["applied"] == 3 and answers[1]["duplicates"] == 3 and answers[2]["duplicates"] == 3
    message = client.get(accepted["url"], headers=auth).get_json()
    assert message["status"] == "read"  # open ranks above delivered: never back down
    assert [e["status"] for e in message["events"]] == ["processed", "open", "delivered"]
    with app.app_context():
        statuses = db.session.scalars(sa.select(Event.data).where(Event.type == "message.status")).all()
        assert [s["status"] for s in statuses].count("read") == 1


def test_forged_stale_and_reserialized_signatures_are_refused(app, client, twilio) -> None:
    event = {"event": "delivered", "sg_event_id": "e1", "email": "x@example.com", "message_id": "0" * 32}
    body = json.dumps([event]).encode()
    stale = twilio.sendgrid.signed_headers(body, timestamp=int(utcnow().timestamp()) - 600)
    assert client.post("/sendgrid/events", data=body, headers=stale).status_code == 403
    reserialized = json.dumps([event], indent=2).encode()  # same JSON, other bytes
    assert client.post("/sendgrid/events", data=reserialized,
                       headers=twilio.sendgrid.signed_headers(body)).status_code == 403
    assert client.post("/sendgrid/events", data=body, headers={"Content-Type": "application/json"}).status_code == 401
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(sa.table("email_events"))) == 0


def test_events_for_unknown_emails_are_acknowledged_and_counted(client, twilio) -> None:
    answer = _post_events(client, twilio, [{"event": "delivered", "sg_event_id": "zz", "email": "a@b.c",
                                            "message_id": "f" * 32}, {"no": "id"}])
    assert answer.status_code == 200
    assert answer.get_json() == {"applied": 0, "duplicates": 0, "unknown_message": 1, "unusable": 1}


def test_unsubscribe_silences_email_and_leaves_whatsapp_alone(app, client, auth, twilio) -> None:
    _email_user(client, auth, phone="+15551230020", channels=["email", "whatsapp"])
    with app.app_context():
        find_user("u1").consent = "opted_in"
        db.session.commit()
    client.post("/notify", json={"user_id": "u1", **RECEIPT}, headers=auth)
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    link = email["headers"]["List-Unsubscribe"].strip("<>")
    path = "/" + link.split("/", 3)[3]
    assert client.post(path[:-2] + "xx").status_code == 404  # an altered link does nothing
    assert client.get(path).status_code == 200  # a link scanner's GET changes nothing
    assert client.get("/users/u1", headers=auth).get_json()["consent"]["email"] == "unknown"
    assert client.post(path).status_code == 200
    assert client.post(path).status_code == 200  # twice is harmless
    consent = client.get("/users/u1", headers=auth).get_json()["consent"]
    assert consent == {"whatsapp": "opted_in", "email": "opted_out"}
    with app.app_context():
        ledger = db.session.scalars(sa.select(ConsentEvent)).all()
        assert [(e.channel, e.action) for e in ledger] == [("email", "opt_out")]
    refused = client.post("/notify", json={"user_id": "u1", "channel": "email", **RECEIPT}, headers=auth)
    assert refused.status_code == 409


def test_a_spam_report_opts_out_of_email_only(client, auth, twilio) -> None:
    _email_user(client, auth, phone="+15551230021")
    client.post("/notify", json={"user_id": "u1", **RECEIPT}, headers=auth)
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    _post_events(client, twilio, [twilio.sendgrid.event(email, "spamreport")])
    assert client.get("/users/u1", headers=auth).get_json()["consent"] == {"whatsapp": "unknown",
                                                                           "email": "opted_out"}


def test_credits_exhausted_holds_the_email_and_sends_it_once_credits_return(app, client, auth, twilio) -> None:
    _email_user(client, auth)
    twilio.sendgrid.fail_next(401, "Maximum credits exceeded", times=10)
    accepted = client.post("/notify", json={"user_id": "u1", **RECEIPT}, headers=auth).get_json()
    run_queue(include_scheduled=False)
    held = client.get(accepted["url"], headers=auth).get_json()
    assert held["status"] == "retrying" and "Maximum credits exceeded" in held["error_message"]
    assert twilio.sendgrid.emails == []
    twilio.sendgrid.reset()  # credits are back
    with app.app_context():  # the hold's time has come
        db.session.execute(sa.update(Message).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
    run_queue()
    from bot.delivery import outbox
    with app.app_context():
        outbox.sweep()
    run_queue()
    assert len(twilio.sendgrid.wait_for_emails(1)) == 1
    assert client.get(accepted["url"], headers=auth).get_json()["status"] == "accepted"


def test_whatsapp_63024_falls_back_to_exactly_one_email_and_its_bounce_to_nothing(app, client, auth, twilio,
                                                                               post_webhook) -> None:
    client.put("/users/u9", json={"phone": "+15551230022", "email": "nine@example.com",
                                  "channels": ["whatsapp", "email"]}, headers=auth)
    first = client.post("/notify", json={"user_id": "u9", "template": "order_update",
                                         "variables": {"1": "Ada", "2": "42"}}, headers=auth).get_json()
    assert first["channel"] == "whatsapp"
    run_queue()
    [sent] = twilio.wait_for_messages(1)
    for _ in range(2):  # a repeated callback makes no second fallback
        post_webhook(status_form(sent["sid"], "failed", 63024, to="+15551230022"))
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["to"] == "nine@example.com"
    original = client.get(first["url"], headers=auth).get_json()
    assert original["fallback"] is not None
    fallback = client.get(f"/messages/{original['fallback']}", headers=auth).get_json()
    assert fallback["channel"] == "email" and fallback["fallback_of"] == first["id"]
    _post_events(client, twilio, [twilio.sendgrid.event(email, "bounce", reason="550 no such user")])
    run_queue()
    assert client.get(f"/messages/{original['fallback']}", headers=auth).get_json()["status"] == "failed"
    assert len(twilio.messages) == 1 and len(twilio.sendgrid.emails) == 1  # no third message
    with app.app_context():
        made = db.session.scalars(sa.select(Event.data).where(Event.type == "message.fallback")).all()
        assert [m["fallback_channel"] for m in made] == ["email"]


def _make_due(app: Flask) -> None:
    with app.app_context():
        db.session.execute(sa.update(Message).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()


def test_a_lost_answer_is_never_resent_blind_and_an_event_settles_it(app, client, auth, twilio) -> None:
    _email_user(client, auth)
    twilio.sendgrid.lose_answer_next(502)
    accepted = client.post("/notify", json={"user_id": "u1", **RECEIPT}, headers=auth).get_json()
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)  # SendGrid took it; we never heard
    unsure = client.get(accepted["url"], headers=auth).get_json()
    assert unsure["status"] == "retrying"
    _make_due(app)
    run_queue()  # inside the grace: it waits for SendGrid's events, it does not send again
    assert len(twilio.sendgrid.emails) == 1
    _post_events(client, twilio, [twilio.sendgrid.event(email, "processed")])
    _make_due(app)
    from bot.delivery import outbox
    with app.app_context():
        outbox.sweep()
    run_queue()
    assert len(twilio.sendgrid.emails) == 1
    settled = client.get(accepted["url"], headers=auth).get_json()
    assert settled["status"] == "accepted" and settled["provider_message_id"] == email["x_message_id"]


def test_after_the_grace_with_no_event_an_unsure_email_is_sent_again(app, client, auth, twilio) -> None:
    app.config["EMAIL_UNSURE_GRACE_SECONDS"] = 1
    _email_user(client, auth)
    twilio.sendgrid.lose_answer_next("drop")
    accepted = client.post("/notify", json={"user_id": "u1", **RECEIPT}, headers=auth).get_json()
    run_queue()
    assert len(twilio.sendgrid.wait_for_emails(1)) == 1
    with app.app_context():  # the attempt was more than the grace ago
        db.session.execute(sa.update(Message).values(unsure_since=utcnow() - timedelta(seconds=5),
                                                     next_attempt_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
    from bot.delivery import outbox
    with app.app_context():
        outbox.sweep()
    run_queue()
    assert len(twilio.sendgrid.wait_for_emails(2)) == 2  # the documented duplicate: no event ever came
    assert client.get(accepted["url"], headers=auth).get_json()["status"] == "accepted"


def test_an_email_backlog_never_holds_whatsapp_back(app, client, auth, twilio) -> None:
    """Email waits behind WhatsApp in the queue, and a WhatsApp send's batch takes WhatsApp's due
    messages before the older emails (which fill its spare places): invariant 16."""
    from bot.delivery import sender
    from bot.delivery.outbox import Priority, send_priority

    assert send_priority("notification", "email") < send_priority("notification", "whatsapp")
    for n in range(3):
        _email_user(client, auth, user_id=f"e{n}")
        client.put(f"/users/e{n}", json={"email": f"e{n}@example.com"}, headers=auth)
        client.post("/notify", json={"user_id": f"e{n}", **RECEIPT}, headers=auth)
    whatsapp = []
    for n in range(3):
        phone = f"+1555123009{n}"
        client.put(f"/users/w{n}", json={"phone": phone, "channels": ["whatsapp"]}, headers=auth)
        with app.app_context():
            find_user(f"w{n}").last_inbound_at = utcnow()
            db.session.commit()
        whatsapp.append(client.post("/notify", json={"user_id": f"w{n}", "body": "hi"}, headers=auth).get_json()["id"])
    app.config["SEND_BATCH"] = 4
    with app.app_context():
        sender.deliver(whatsapp[0])
    assert len(twilio.wait_for_messages(3)) == 3  # every WhatsApp message went in the first batch
    assert len(twilio.sendgrid.wait_for_emails(1)) == 1  # one email rode along in the spare place
    assert Priority.EMAIL < Priority.BULK < Priority.CONVERSATION



def test_stop_on_whatsapp_leaves_email_consent_alone(app, client, auth, twilio, post_webhook) -> None:
    from tests.conftest import inbound_form

    client.put("/users/s1", json={"phone": "+15551230031", "email": "s1@example.com"}, headers=auth)
    post_webhook(inbound_form(from_="+15551230031", body="STOP"))
    run_queue()
    assert client.get("/users/s1", headers=auth).get_json()["consent"] == {"whatsapp": "opted_out",
                                                                           "email": "unknown"}
    answer = client.post("/notify", json={"user_id": "s1", **RECEIPT}, headers=auth).get_json()
    assert answer["channel"] == "email"  # WhatsApp is skipped, email still reaches them
    run_queue()
    assert len(twilio.sendgrid.wait_for_emails(1)) == 1
