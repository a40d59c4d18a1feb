"""Quiet hours checked again when a message is sent (invariant 15; docs/ARCHITECTURE.md, "Quiet
hours at send time"): a message made before the quiet hours whose send comes due inside them (a
retry after a transient Twilio error, a backlog, a fallback) is held until they end in the
recipient's own timezone, then sent once; a request's `"quiet_hours": null` and a reply are never
held. Real HTTP to the simulator, signed webhooks; time moves on the app's clock, not by sleeping."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from bot.broadcasts import pump
from bot.clock import isoformat
from bot.delivery import outbox, release
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Event, Message
from bot.vocabulary import Kind, MessageStatus
from tests.app_clock import AppClock, app_clock  # noqa: F401 - the fixture
from tests.conftest import inbound_form, run_queue, status_form

PHONE = "+15551234567"
EMAIL = "ana@example.com"
QUIET = "21:00-08:00"
TEMPLATE = {"template": "order_update", "variables": {"1": "Ana", "2": "42"}}
# Sao Paulo has kept -03:00 all year since 2019.
EVENING = datetime(2026, 6, 10, 23, 59)  # 20:59 in Sao Paulo: a minute before the quiet hours
LATE = datetime(2026, 6, 11, 0, 5)  # 21:05 there: inside them
MORNING = datetime(2026, 6, 11, 11, 0)  # 08:00 there: they end


@pytest.fixture
def ana(app, client, auth, app_clock: AppClock) -> str:  # noqa: F811
    """A user in Sao Paulo with WhatsApp, then email; QUIET_HOURS 21:00-08:00; 20:59 there."""
    app.config["QUIET_HOURS"] = QUIET
    app_clock.set(EVENING)
    answer = client.put("/users/ana", json={"phone": PHONE, "email": EMAIL, "timezone": "America/Sao_Paulo",
                                            "channels": ["whatsapp", "email"]}, headers=auth)
    assert answer.status_code in (200, 201), answer.get_json()
    return "ana"


def notify(client, auth, **extra) -> dict:
    answer = client.post("/notify", json={"user_id": "ana", **TEMPLATE, **extra}, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()


def message(client, auth, accepted: dict) -> dict:
    return client.get(accepted["url"], headers=auth).get_json()


def held_events(app, message_id: str) -> list[dict]:
    with app.app_context():
        return list(db.session.scalars(sa.select(Event.data).where(Event.type == "message.held",
                                                                   Event.message_id == message_id)))


def test_a_retry_that_comes_due_inside_the_quiet_hours_is_held_until_they_end_and_sent_once(
        app, client, auth, twilio, ana, app_clock):  # noqa: F811
    accepted = notify(client, auth)
    assert accepted["held_until"] is None  # 20:59: it may leave now
    twilio.fail_next(503, 20503, "Service Unavailable")
    run_queue(include_scheduled=False)  # the first attempt fails; its retry waits
    assert twilio.messages == [] and len(twilio.requests) == 1
    app_clock.set(LATE)  # 21:05: the retry comes due inside the quiet hours
    run_queue()
    assert len(twilio.requests) == 1  # not sent into the night
    held = message(client, auth, accepted)
    assert (held["status"], held["held_until"], held["held_reason"]) == ("pending", isoformat(MORNING), "quiet_hours")
    assert held["attempts"] == 1  # the held claim is not an attempt
    [event] = held_events(app, accepted["id"])
    assert (event["held_until"], event["reason"], event["kind"]) == (isoformat(MORNING), "quiet_hours", Kind.NOTIFICATION)
    with app.app_context():
        assert outbox.sweep(LATE + timedelta(minutes=10))["outbound"] == 0  # the release's, not the sweep's
        assert release.release_due(MORNING - timedelta(seconds=1)) == 0
    run_queue()
    assert len(twilio.requests) == 1
    app_clock.set(MORNING)
    with app.app_context():
        assert release.release_due() == 1
    run_queue()
    with app.app_context():
        assert release.release_due(MORNING + timedelta(hours=1)) == 0
    run_queue()
    assert [m["to"] for m in twilio.messages] == [f"whatsapp:{PHONE}"]  # sent once
    sent = message(client, auth, accepted)
    assert (sent["status"], sent["held_until"], sent["attempts"]) == ("queued", None, 2)
    assert sent["twilio_sid"] == twilio.messages[0]["sid"]


def test_a_message_claimed_late_from_a_backlog_is_held_without_calling_twilio(
        app, client, auth, twilio, ana, app_clock):  # noqa: F811
    accepted = notify(client, auth)
    app_clock.set(LATE)  # the queue was busy: its task runs at 21:05
    run_queue()
    assert twilio.requests == []
    held = message(client, auth, accepted)
    assert (held["status"], held["held_until"], held["attempts"]) == ("pending", isoformat(MORNING), 0)
    # Held, it can be called back like any held message.
    assert client.post(accepted["url"] + "/cancel", headers=auth).get_json()["status"] == "canceled"
    app_clock.set(MORNING)
    with app.app_context():
        assert release.release_due() == 0
    run_queue()
    assert twilio.requests == []


def test_a_request_without_quiet_hours_is_never_held_at_send_time(app, client, auth, twilio, ana, app_clock):  # noqa: F811
    accepted = notify(client, auth, quiet_hours=None)
    twilio.fail_next(503, 20503, "Service Unavailable")
    run_queue(include_scheduled=False)
    app_clock.set(LATE)
    run_queue()
    assert len(twilio.messages) == 1
    assert message(client, auth, accepted)["status"] == "queued"
    with app.app_context():
        assert db.session.get(Message, accepted["id"]).quiet_hours is None
    assert held_events(app, accepted["id"]) == []


def test_a_reply_is_never_held_at_send_time(app, client, auth, twilio, post_webhook, ana, app_clock):  # noqa: F811
    app_clock.set(LATE)  # 21:05: Ana writes; the bot's replies fail once, and go at 23:00
    assert post_webhook(inbound_form(PHONE, "hello")).status_code == 200
    twilio.fail_next(503, 20503, "Service Unavailable")
    run_queue(include_scheduled=False)
    app_clock.set(LATE + timedelta(hours=2))
    run_queue()
    with app.app_context():
        rows = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")).all()
        assert rows and {row.kind for row in rows} <= {Kind.REPLY}
        assert all(row.quiet_hours is None and row.not_before is None for row in rows)
        assert {row.status for row in rows} == {MessageStatus.QUEUED}
    assert len(twilio.messages) == len(rows)


def test_a_fallback_email_inherits_the_quiet_hours_and_waits_for_their_end(
        app, client, auth, twilio, post_webhook, ana, app_clock):  # noqa: F811
    first = notify(client, auth)
    run_queue()
    [sent] = twilio.wait_for_messages(1)  # 20:59: WhatsApp took it
    app_clock.set(LATE)  # 21:05: WhatsApp says Ana is not on it; the email would go now
    assert post_webhook(status_form(sent["sid"], "failed", 63024, to=PHONE)).status_code == 200
    run_queue()
    assert twilio.sendgrid.emails == []
    fallback_id = message(client, auth, first)["fallback"]
    assert fallback_id is not None
    fallback = client.get(f"/messages/{fallback_id}", headers=auth).get_json()
    assert (fallback["channel"], fallback["status"], fallback["held_until"], fallback["held_reason"]) == (
        "email", "pending", isoformat(MORNING), "quiet_hours")
    with app.app_context():
        assert db.session.get(Message, fallback_id).quiet_hours == QUIET
    app_clock.set(MORNING)
    with app.app_context():
        assert release.release_due() == 1
    run_queue()
    [email] = twilio.sendgrid.wait_for_emails(1)
    assert email["to"] == EMAIL
    assert client.get(f"/messages/{fallback_id}", headers=auth).get_json()["status"] == "accepted"


@pytest.mark.parametrize("zone, made, due, ends", [
    # 2026-03-28 in Berlin: 20:59 CET, the retry due at 22:30 CET; the clocks spring forward at
    # 02:00, so 08:00 CEST is 06:00 UTC (a night of 9.5 hours).
    ("Europe/Berlin", datetime(2026, 3, 28, 19, 59), datetime(2026, 3, 28, 21, 30), datetime(2026, 3, 29, 6, 0)),
    # 2019-02-16 in Sao Paulo: 20:59 -02, the retry due at 23:30 -02; at midnight the clocks went
    # back to 23:00 -03, so 08:00 is 11:00 UTC (a night an hour longer).
    ("America/Sao_Paulo", datetime(2019, 2, 16, 22, 59), datetime(2019, 2, 17, 1, 30), datetime(2019, 2, 17, 11, 0)),
])
def test_a_send_time_hold_across_a_daylight_saving_change_ends_at_the_right_instant(
        app, client, auth, twilio, ana, app_clock, zone, made, due, ends):  # noqa: F811
    client.put("/users/ana", json={"phone": PHONE, "timezone": zone}, headers=auth)
    app_clock.set(made)
    accepted = notify(client, auth)
    assert accepted["held_until"] is None
    twilio.fail_next(503, 20503, "Service Unavailable")
    run_queue(include_scheduled=False)
    app_clock.set(due)
    run_queue()
    assert message(client, auth, accepted)["held_until"] == isoformat(ends)
    with app.app_context():
        assert release.release_due(ends - timedelta(seconds=1)) == 0
    app_clock.set(ends)
    with app.app_context():
        assert release.release_due() == 1
    run_queue()
    assert len(twilio.messages) == 1


def test_a_broadcasts_message_keeps_its_quiet_hours_and_is_held_when_sent_late(
        app, client, auth, twilio, ana, app_clock):  # noqa: F811
    accepted = client.post("/broadcasts", json={"audience": {"user_ids": ["ana"]}, **TEMPLATE, "quiet_hours": QUIET},
                           headers=auth)
    assert accepted.status_code == 202, accepted.get_json()
    broadcast_id = accepted.get_json()["id"]
    huey.flush()  # the pump's chain is driven by hand here: one step at 20:59 releases the message
    with app.app_context():
        while pump._step(broadcast_id, None)[0] == "expanding":
            pass
        [row] = db.session.scalars(sa.select(Message).where(Message.broadcast_id == broadcast_id)).all()
        assert (row.quiet_hours, row.not_before) == (QUIET, None)
    app_clock.set(LATE)  # its send task runs at 21:05
    run_queue(include_scheduled=False)
    assert twilio.requests == []
    with app.app_context():
        row = db.session.get(Message, row.id)
        assert (row.status, row.not_before) == (MessageStatus.PENDING, MORNING)
    app_clock.set(MORNING)
    with app.app_context():
        assert release.release_due() == 1
    run_queue(include_scheduled=False)
    assert len(twilio.messages) == 1


def test_a_held_message_whose_earlier_attempt_may_have_left_cannot_be_canceled(
        app, client, auth, twilio, ana, app_clock):  # noqa: F811
    accepted = notify(client, auth)
    app_clock.set(LATE)
    run_queue()
    with app.app_context():  # as a re-taken claim leaves it: an earlier attempt may have been accepted
        db.session.execute(sa.update(Message).where(Message.id == accepted["id"]).values(unsure_since=EVENING))
        db.session.commit()
    refused = client.post(accepted["url"] + "/cancel", headers=auth)
    assert refused.status_code == 409 and refused.get_json()["status"] == "pending"


def test_the_check_costs_no_statement(app, client, auth, twilio, ana, app_clock):  # noqa: F811
    """A batch reads its recipients (their timezones included) in the statement it always ran: a
    message with quiet hours that do not cover now costs exactly what one without them costs."""
    with app.app_context():
        engine = db.engine
    counted = {"statements": 0}

    def statement(*_args) -> None:
        counted["statements"] += 1

    def statements_to_send(**extra) -> int:
        notify(client, auth, **extra)
        counted["statements"] = 0
        sa.event.listen(engine, "before_cursor_execute", statement)
        try:
            run_queue()
        finally:
            sa.event.remove(engine, "before_cursor_execute", statement)
        return counted["statements"]

    app_clock.set(MORNING + timedelta(hours=3))  # 11:00 there: outside the quiet hours
    without = statements_to_send(quiet_hours=None)
    with_them = statements_to_send()
    assert len(twilio.messages) == 2
    assert without == with_them > 0
