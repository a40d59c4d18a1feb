"""POST /notify with `send_at`: held in the database until then, sent when due, cancellable until
it leaves (invariant 15; docs/api.md, "Scheduled sends")."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from bot.clock import isoformat, utcnow
from bot.delivery import release
from bot.extensions import db
from bot.models import Event, Message
from bot.vocabulary import EventType, MessageStatus
from tests.conftest import make_contact, run_queue

PHONE = "+15551234567"


def rfc3339(moment: datetime, offset_hours: int = 0) -> str:
    """Naive UTC `moment` written with a UTC offset of `offset_hours` (the same instant)."""
    return moment.replace(tzinfo=timezone.utc).astimezone(timezone(timedelta(hours=offset_hours))).isoformat()


def schedule(client, auth, when: str, **extra):
    """Free text (inside the 24-hour window at `when`, or a 422), unless `extra` names a template."""
    body = {"body": "see you at nine"} if "template" not in extra else {}
    return client.post("/notify", json={"to": PHONE, **body, "send_at": when, **extra}, headers=auth)


TEMPLATE = {"template": "order_update", "variables": {"1": "Ada"}}


def test_a_scheduled_message_is_held_then_sent_at_its_time(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        send_at = (utcnow() + timedelta(hours=3)).replace(microsecond=0)
        answer = schedule(client, auth, rfc3339(send_at, offset_hours=-3))  # any offset: one instant
        assert answer.status_code == 202, answer.get_json()
        accepted = answer.get_json()
        assert accepted["status"] == MessageStatus.PENDING
        assert accepted["send_at"] == accepted["held_until"] == isoformat(send_at)
        assert accepted["held_reason"] == "scheduled"
        shown = client.get(accepted["url"], headers=auth).get_json()
        assert (shown["status"], shown["held_until"], shown["held_reason"]) == ("pending", isoformat(send_at), "scheduled")
        # The queue's hint (its task scheduled for then) run early sends nothing: the row decides.
        assert run_queue() >= 1
        assert twilio.messages == []
        assert release.release_due(send_at - timedelta(seconds=1)) == 0
        assert release.release_due(send_at) == 1
        run_queue()
        assert [m["body"] for m in twilio.messages] == ["see you at nine"]
        shown = client.get(accepted["url"], headers=auth).get_json()
        assert shown["status"] == "queued" and shown["held_until"] is None and shown["send_at"] == isoformat(send_at)


def test_the_backend_hears_that_a_message_is_held(app, client, auth):
    with app.app_context():
        make_contact(PHONE)
        send_at = (utcnow() + timedelta(days=2)).replace(microsecond=0)
        message_id = schedule(client, auth, rfc3339(send_at), metadata={"order": "A-17"}, **TEMPLATE).get_json()["id"]
        # Read from the table: GET /events serves an event once every older transaction of the
        # PostgreSQL cluster has ended, and a shared test server may have one open elsewhere.
        events = db.session.scalars(sa.select(Event).where(Event.message_id == message_id)).all()
        assert [event.type for event in events] == [EventType.MESSAGE_HELD]
        data = events[0].body()["data"]
        assert data["message_id"] == message_id and data["held_until"] == isoformat(send_at)
        assert data["reason"] == "scheduled" and data["metadata"] == {"order": "A-17"}
        # message.status is unchanged: nothing is reported there until the message moves.


def test_a_send_at_now_or_within_a_minute_past_sends_at_once(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        accepted = schedule(client, auth, rfc3339(utcnow() - timedelta(seconds=30))).get_json()
        assert accepted["held_until"] is None and accepted["held_reason"] is None
        run_queue()
        assert len(twilio.messages) == 1


@pytest.mark.parametrize("when, why", [
    ("2026-12-24T09:00:00", "RFC 3339"),  # no offset: which 09:00?
    ("2026-12-24", "RFC 3339"),
    ("tomorrow at nine", "RFC 3339"),
    ("2026-12-24T09:00:00+25:00", "RFC 3339"),
    ("2026-02-30T09:00:00Z", "RFC 3339"),
    ("0001-01-01T00:00:00+01:00", "RFC 3339"),
    (12345, "RFC 3339"),
])
def test_a_bad_send_at_is_a_400_naming_it(client, auth, when, why):
    answer = schedule(client, auth, when)
    assert answer.status_code == 400
    assert "'send_at'" in answer.get_json()["error"] and why in answer.get_json()["error"]


def test_a_send_at_in_the_past_or_beyond_35_days_is_a_400(app, client, auth):
    with app.app_context():
        make_contact(PHONE)
        past = schedule(client, auth, rfc3339(utcnow() - timedelta(hours=1)))
        assert past.status_code == 400 and "in the past" in past.get_json()["error"]
        far = schedule(client, auth, rfc3339(utcnow() + timedelta(days=35, minutes=5)))
        assert far.status_code == 400 and "35 days" in far.get_json()["error"]
        assert schedule(client, auth, rfc3339(utcnow() + timedelta(days=34, hours=23)), **TEMPLATE).status_code == 202
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1


def test_a_scheduled_message_by_user_id_is_held_too(app, client, auth, twilio):
    with app.app_context():
        client.put("/users/u1", json={"email": "ada@example.com"}, headers=auth)
        send_at = (utcnow() + timedelta(minutes=10)).replace(microsecond=0)
        accepted = client.post("/notify", json={"user_id": "u1", "subject": "Hi", "body": "later",
                                                "send_at": rfc3339(send_at, 5)}, headers=auth).get_json()
        assert accepted["channel"] == "email" and accepted["held_until"] == isoformat(send_at)
        run_queue()
        assert twilio.sendgrid.emails == []
        assert release.release_due(send_at) == 1
        run_queue()
        assert len(twilio.sendgrid.emails) == 1
        db.session.expire_all()
        assert db.session.get(Message, accepted["id"]).status == MessageStatus.ACCEPTED


def test_one_idempotency_key_schedules_one_message_and_replays_its_hold(app, client, auth):
    with app.app_context():
        make_contact(PHONE)
        when = rfc3339((utcnow() + timedelta(hours=1)).replace(microsecond=0))
        headers = {**auth, "Idempotency-Key": "k-1"}
        one = client.post("/notify", json={"to": PHONE, "body": "x", "send_at": when}, headers=headers)
        two = client.post("/notify", json={"to": PHONE, "body": "x", "send_at": when}, headers=headers)
        assert one.get_json()["id"] == two.get_json()["id"] and two.headers["Idempotent-Replayed"] == "true"
        assert two.get_json()["held_until"] == one.get_json()["held_until"] is not None
        other = client.post("/notify", json={"to": PHONE, "body": "x", "send_at": rfc3339(utcnow() + timedelta(hours=2))},
                            headers=headers)
        assert other.status_code == 422
        # The same instant with another offset is the same request.
        same = client.post("/notify", json={"to": PHONE, "body": "x", "send_at": when.replace("+00:00", "Z")},
                           headers=headers)
        assert same.get_json()["id"] == one.get_json()["id"]
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1


# ---------------------------------------------------------------- POST /messages/<id>/cancel

def test_cancel_a_scheduled_message(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        send_at = (utcnow() + timedelta(hours=1)).replace(microsecond=0)
        message_id = schedule(client, auth, rfc3339(send_at)).get_json()["id"]
        canceled = client.post(f"/messages/{message_id}/cancel", headers=auth)
        assert canceled.status_code == 200
        assert canceled.get_json()["status"] == "canceled" and canceled.get_json()["held_until"] is None
        again = client.post(f"/messages/{message_id}/cancel", headers=auth)
        assert again.status_code == 200 and again.get_json()["status"] == "canceled"
        assert release.release_due(send_at + timedelta(hours=1)) == 0
        run_queue()
        assert twilio.messages == []
        assert client.get(f"/messages/{message_id}", headers=auth).get_json()["status"] == "canceled"
        types = db.session.scalars(sa.select(Event.type).where(Event.message_id == message_id)).all()
        assert sorted(types) == [EventType.MESSAGE_CANCELED, EventType.MESSAGE_HELD]


def test_cancel_after_it_left_is_a_409(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        message_id = client.post("/notify", json={"to": PHONE, "body": "now"}, headers=auth).get_json()["id"]
        run_queue()
        too_late = client.post(f"/messages/{message_id}/cancel", headers=auth)
        assert too_late.status_code == 409
        assert too_late.get_json()["status"] == "queued" and "too late" in too_late.get_json()["error"]
        assert len(twilio.messages) == 1


def test_cancel_of_an_unknown_or_malformed_id_is_a_404(client, auth):
    assert client.post("/messages/" + "a" * 32 + "/cancel", headers=auth).status_code == 404
    assert client.post("/messages/nope/cancel", headers=auth).get_json()["error"]
    assert client.post("/messages/" + "a" * 32 + "/cancel").status_code == 401


def test_scheduled_and_canceled_answers_match_their_documented_schemas(app, client, auth, twilio):
    from tests.http.test_openapi import matches_documented_schema

    with app.app_context():
        make_contact(PHONE)
        accepted = schedule(client, auth, rfc3339(utcnow() + timedelta(hours=1)), quiet_hours="21:00-08:00")
        matches_documented_schema("MessageAccepted", accepted.get_json())
        matches_documented_schema("Message", client.get(accepted.headers["Location"], headers=auth).get_json())
        canceled = client.post(f"/messages/{accepted.get_json()['id']}/cancel", headers=auth)
        matches_documented_schema("Message", canceled.get_json())
        sent = client.post("/notify", json={"to": PHONE, "body": "now"}, headers=auth).get_json()
        run_queue()
        too_late = client.post(f"/messages/{sent['id']}/cancel", headers=auth)
        assert too_late.status_code == 409
        matches_documented_schema("CancelRefused", too_late.get_json())


def test_free_text_scheduled_past_the_24_hour_window_is_refused_now(app, client, auth, twilio):
    """The contact wrote 5 minutes ago: free text in an hour may go, in two days it could not
    (invariant 5), so the backend hears it at once (422), not from a failed send later; a
    template may be scheduled whenever."""
    with app.app_context():
        make_contact(PHONE)
        assert schedule(client, auth, rfc3339(utcnow() + timedelta(hours=1))).status_code == 202
        late = schedule(client, auth, rfc3339(utcnow() + timedelta(days=2)))
        assert late.status_code == 422 and "held until" in late.get_json()["error"]
        template = client.post("/notify", json={"to": PHONE, "template": "order_update", "variables": {"1": "Ada"},
                                                "send_at": rfc3339(utcnow() + timedelta(days=2))}, headers=auth)
        assert template.status_code == 202


def test_a_users_free_text_scheduled_past_the_window_goes_by_email(app, client, auth):
    with app.app_context():
        client.put("/users/u2", json={"phone": PHONE, "email": "ada@example.com"}, headers=auth)
        from bot.conversations.users import find_user
        find_user("u2").last_inbound_at = utcnow() - timedelta(minutes=5)
        db.session.commit()
        body = {"user_id": "u2", "subject": "Hi", "body": "text"}
        soon = client.post("/notify", json={**body, "send_at": rfc3339(utcnow() + timedelta(hours=1))}, headers=auth)
        assert soon.get_json()["channel"] == "whatsapp"
        later = client.post("/notify", json={**body, "send_at": rfc3339(utcnow() + timedelta(days=2))}, headers=auth)
        assert later.status_code == 202 and later.get_json()["channel"] == "email"
        pinned = client.post("/notify", json={**body, "channel": "whatsapp",
                                              "send_at": rfc3339(utcnow() + timedelta(days=2))}, headers=auth)
        assert pinned.status_code == 422 and "held until" in pinned.get_json()["error"]
