"""Backend-started flows behave like /notify (invariant 15; docs/ARCHITECTURE.md, "Scheduled
flows"): `send_at` and `quiet_hours` on POST /notify with `flow` hold the conversation in the
database (never only in the queue), it starts at its time, can be canceled until then, survives a
queue flush (the release and the sweep read the database), and its first messages are held by
the user's quiet hours like a notification's; its answers to the user's own messages never are.
Through HTTP, signed webhooks, the queue and the Twilio simulator."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from bot.clock import isoformat, utcnow
from bot.delivery import outbox, release
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Conversation, Event, Message
from bot.vocabulary import ConversationStatus, EventType
from tests.app_clock import app_clock  # noqa: F401 - the fixture
from tests.conftest import inbound_form, run_queue
from tests.delivery.test_quiet_hours import around, wrote_recently

PHONE = "+15551234567"
FLOW = {"flow": "appointment", "variables": {"name": "Ada", "date": "12/03", "time": "10:30"}}


def rfc3339(moment: datetime, offset_hours: int = 0) -> str:
    """Naive UTC `moment` written with a UTC offset of `offset_hours` (the same instant)."""
    return moment.replace(tzinfo=timezone.utc).astimezone(timezone(timedelta(hours=offset_hours))).isoformat()


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


def _user(client, auth, zone: str = "Asia/Tokyo", user_id: str = "ada") -> str:
    assert client.put(f"/users/{user_id}", json={"phone": PHONE, "timezone": zone}, headers=auth).status_code in (200, 201)
    wrote_recently(user_id)
    return user_id


def _start(client, auth, user_id: str = "ada", **extra):
    answer = client.post("/notify", json={"user_id": user_id, **FLOW, **extra}, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()


def _conversation(conversation_id: str) -> Conversation:
    db.session.expire_all()
    return db.session.get(Conversation, conversation_id)


def test_a_scheduled_flow_is_held_then_started_at_its_time(ctx, client, auth, twilio, app_clock):  # noqa: F811
    _user(client, auth)
    send_at = (utcnow() + timedelta(hours=3)).replace(microsecond=0)
    accepted = _start(client, auth, send_at=rfc3339(send_at, -3), quiet_hours=None)
    assert accepted["status"] == "starting"
    assert accepted["send_at"] == accepted["held_until"] == isoformat(send_at)
    assert accepted["held_reason"] == "scheduled"
    shown = client.get(accepted["url"], headers=auth).get_json()
    assert (shown["status"], shown["held_until"], shown["held_reason"]) == ("starting", isoformat(send_at), "scheduled")
    # The queue's hint run early starts nothing: the row decides.
    assert run_queue() >= 1
    assert twilio.messages == [] and _conversation(accepted["id"]).status == ConversationStatus.STARTING
    assert release.release_due(send_at - timedelta(seconds=1)) == 0
    app_clock.set(send_at)
    assert release.release_due() == 1
    run_queue()
    assert len(twilio.messages) == 1 and "12/03" in twilio.messages[0]["body"]
    shown = client.get(accepted["url"], headers=auth).get_json()
    assert shown["status"] == "active" and shown["held_until"] is None and shown["send_at"] == isoformat(send_at)


def test_a_held_flow_is_reported_as_held_once_then_started(ctx, client, auth, twilio, app_clock):  # noqa: F811
    """conversation.held in the transaction that stores the held flow (the backend learns it is
    waiting and until when, as message.held tells of a message), then conversation.started when
    it starts; a flow that starts at once is never reported held."""
    _user(client, auth)
    send_at = (utcnow() + timedelta(hours=3)).replace(microsecond=0)
    accepted = _start(client, auth, send_at=rfc3339(send_at, 2), quiet_hours=None,
                      metadata={"campaign": "reminders"})
    [held] = db.session.scalars(sa.select(Event).where(Event.type == EventType.CONVERSATION_HELD)).all()
    assert held.conversation_id == accepted["id"]
    assert {key: held.data[key] for key in ("conversation_id", "user_id", "flow", "held_until", "reason",
                                            "send_at", "started_by", "metadata")} == {
        "conversation_id": accepted["id"], "user_id": "ada", "flow": "appointment",
        "held_until": isoformat(send_at), "reason": "scheduled", "send_at": isoformat(send_at),
        "started_by": "backend", "metadata": {"campaign": "reminders"}}
    app_clock.set(send_at)
    assert release.release_due() == 1
    run_queue()
    types = db.session.scalars(sa.select(Event.type).where(Event.conversation_id == accepted["id"],
                                                           Event.type.like("conversation.%"))
                               .order_by(Event.txid, Event.seq)).all()
    assert types == [EventType.CONVERSATION_HELD, EventType.CONVERSATION_STARTED]
    quiet, ends = around(app_clock(), "Asia/Tokyo")
    inside = _start(client, auth, quiet_hours=quiet)
    reason = db.session.scalars(sa.select(Event.data).where(Event.type == EventType.CONVERSATION_HELD,
                                                            Event.conversation_id == inside["id"])).one()
    assert (reason["reason"], reason["held_until"], reason["send_at"]) == ("quiet_hours", isoformat(ends), None)
    at_once = _start(client, auth, quiet_hours=None)
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Event).where(
        Event.type == EventType.CONVERSATION_HELD, Event.conversation_id == at_once["id"])) == 0


@pytest.mark.parametrize("send_at, quiet_hours, says", [
    ("past", None, "in the past"),
    ("far", None, "35 days"),
    ("2026-12-24T09:00:00", None, "offset"),
    ("tomorrow", None, "RFC 3339"),
    (None, "25:00-08:00", "quiet_hours"),
    (None, "21:00", "quiet_hours"),
])
def test_bad_send_at_or_quiet_hours_for_a_flow_are_400s(ctx, client, auth, send_at, quiet_hours, says):
    _user(client, auth)
    body = dict(FLOW, user_id="ada")
    if send_at == "past":
        body["send_at"] = rfc3339(utcnow() - timedelta(hours=1))
    elif send_at == "far":
        body["send_at"] = rfc3339(utcnow() + timedelta(days=35, minutes=5))
    elif send_at is not None:
        body["send_at"] = send_at
    if quiet_hours is not None:
        body["quiet_hours"] = quiet_hours
    answer = client.post("/notify", json=body, headers=auth)
    assert answer.status_code == 400 and answer.is_json
    assert says in answer.get_json()["error"], answer.get_json()
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Conversation)) == 0
    # A time inside the window is fine, and by number too.
    fine = client.post("/notify", json={"to": PHONE, **FLOW, "send_at": rfc3339(utcnow() + timedelta(hours=2))},
                       headers=auth)
    assert fine.status_code == 202 and fine.get_json()["held_reason"] == "scheduled"


def test_a_scheduled_flow_can_be_canceled_until_it_starts(ctx, client, auth, twilio, app_clock):  # noqa: F811
    _user(client, auth)
    send_at = (utcnow() + timedelta(hours=1)).replace(microsecond=0)
    held = _start(client, auth, send_at=rfc3339(send_at))
    canceled = client.post(f"/conversations/{held['id']}/cancel", headers=auth)
    assert canceled.status_code == 200 and canceled.get_json()["status"] == "cancelled"
    assert canceled.get_json()["held_until"] is None
    again = client.post(f"/conversations/{held['id']}/cancel", headers=auth)
    assert again.status_code == 200 and again.get_json()["status"] == "cancelled"
    app_clock.set(send_at)
    assert release.release_due() == 0
    run_queue()
    assert twilio.messages == []
    events = db.session.scalars(sa.select(Event).where(Event.conversation_id == held["id"])).all()
    assert [event.type for event in events] == [EventType.CONVERSATION_HELD, EventType.CONVERSATION_CANCELLED]
    # Started: too late.
    started = _start(client, auth)
    run_queue()
    late = client.post(f"/conversations/{started['id']}/cancel", headers=auth)
    assert late.status_code == 409 and late.get_json()["status"] == "active" and "too late" in late.get_json()["error"]
    assert len(twilio.messages) == 1
    for unknown in ("0" * 32, "not-an-id"):
        missing = client.post(f"/conversations/{unknown}/cancel", headers=auth)
        assert missing.status_code == 404 and missing.is_json and missing.get_json()["error"]
    assert client.post(f"/conversations/{held['id']}/cancel").status_code == 401


def test_a_held_flow_survives_a_queue_flush_and_the_sweep_leaves_it_until_its_time(
        ctx, client, auth, twilio, app_clock):  # noqa: F811
    _user(client, auth)
    send_at = (utcnow() + timedelta(minutes=30)).replace(microsecond=0)
    accepted = _start(client, auth, send_at=rfc3339(send_at))
    huey.flush()  # a Redis flush, a restart: the hint is gone
    app_clock.set(utcnow() + timedelta(minutes=5))  # long enough for the sweep to call it stuck
    assert outbox.sweep()["conversations"] == 0  # held: the release's, never the sweep's
    run_queue()
    assert twilio.messages == []
    app_clock.set(send_at + timedelta(seconds=1))
    from bot.delivery import tasks
    tasks.sweep_outbox.call_local()  # the minute's sweep releases it as well as each consumer's tick
    run_queue()
    assert len(twilio.messages) == 1
    assert _conversation(accepted["id"]).status == ConversationStatus.ACTIVE


def test_a_second_held_flow_is_not_replaced_when_the_first_starts(ctx, client, auth, twilio, app_clock):  # noqa: F811
    _user(client, auth)
    now = utcnow().replace(microsecond=0)
    first = _start(client, auth, send_at=rfc3339(now + timedelta(hours=1)), quiet_hours=None)
    second = _start(client, auth, send_at=rfc3339(now + timedelta(hours=2)), quiet_hours=None)
    app_clock.set(now + timedelta(hours=1))
    assert release.release_due() == 1
    run_queue()
    assert _conversation(second["id"]).status == ConversationStatus.STARTING  # still waiting for its time
    app_clock.set(now + timedelta(hours=2))
    assert release.release_due() == 1
    run_queue()
    assert _conversation(second["id"]).status == ConversationStatus.ACTIVE
    assert _conversation(first["id"]).status == ConversationStatus.CANCELLED  # replaced when the second began
    assert len(twilio.messages) == 2


def test_a_flow_inside_quiet_hours_starts_when_they_end_and_its_replies_are_never_held(
        ctx, app, client, auth, twilio, post_webhook, app_clock):  # noqa: F811
    _user(client, auth)
    quiet, ends = around(utcnow(), "Asia/Tokyo")
    app.config["QUIET_HOURS"] = quiet
    accepted = _start(client, auth)
    assert accepted["held_until"] == isoformat(ends) and accepted["held_reason"] == "quiet_hours"
    assert accepted["send_at"] is None
    run_queue()
    assert twilio.messages == []
    assert release.release_due(ends - timedelta(seconds=1)) == 0
    app_clock.set(ends)
    assert release.release_due() == 1
    run_queue()
    assert len(twilio.messages) == 1
    [opening] = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")).all()
    assert opening.quiet_hours == quiet  # its first message carries them, as a notification does
    # A day later, inside the quiet hours again, the user answers: the reply leaves at once.
    app_clock.set(ends + timedelta(hours=23, minutes=30))
    assert post_webhook(inbound_form(PHONE, "1")).status_code == 200
    run_queue()
    assert len(twilio.messages) == 2 and "confirmed" in twilio.messages[-1]["body"]
    replies = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")
                                 .order_by(Message.created_at)).all()
    assert replies[-1].quiet_hours is None and replies[-1].not_before is None


def test_a_flows_first_message_coming_due_inside_quiet_hours_is_held_at_send(
        ctx, app, client, auth, twilio, app_clock):  # noqa: F811
    """Accepted outside the quiet hours, started once they began (a backlog): the opening
    message is held by the sender until they end, with message.held, as a notification is."""
    _user(client, auth)
    later = utcnow() + timedelta(hours=3)
    quiet, ends = around(later, "Asia/Tokyo")
    accepted = _start(client, auth, quiet_hours=quiet)
    assert accepted["held_until"] is None
    app_clock.set(later)  # the start ran late: now inside them
    run_queue()
    assert twilio.messages == []
    [opening] = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")).all()
    assert opening.status == "pending" and opening.not_before == ends
    held = db.session.scalars(sa.select(Event).where(Event.type == EventType.MESSAGE_HELD)).all()
    assert [event.data["reason"] for event in held] == ["quiet_hours"]
    app_clock.set(ends)
    assert release.release_due() == 1
    run_queue()
    assert len(twilio.messages) == 1


def test_quiet_hours_off_for_the_request_start_a_flow_at_once(ctx, app, client, auth, twilio):
    _user(client, auth)
    app.config["QUIET_HOURS"], _ = around(utcnow(), "Asia/Tokyo")
    accepted = _start(client, auth, quiet_hours=None)
    assert accepted["held_until"] is None
    run_queue()
    assert len(twilio.messages) == 1


def test_a_flow_held_across_the_berlin_spring_forward_starts_at_the_right_instant(
        ctx, app, client, auth, twilio, app_clock):  # noqa: F811
    """2026-03-28, 22:30 in Berlin (21:30 UTC): quiet 21:00-08:00 holds the flow until 08:00
    summer time on the 29th, 06:00 UTC (the clocks jumped at 02:00), not a second before."""
    evening = datetime(2026, 3, 28, 21, 30)
    app_clock.set(evening)
    _user(client, auth, zone="Europe/Berlin", user_id="dora")
    accepted = _start(client, auth, user_id="dora", quiet_hours="21:00-08:00")
    instant = datetime(2026, 3, 29, 6, 0)
    assert accepted["held_until"] == "2026-03-29T06:00:00Z" == isoformat(instant)
    huey.flush()
    assert release.release_due(evening + timedelta(hours=8)) == 0  # 07:30 summer time: still quiet
    assert release.release_due(instant - timedelta(seconds=1)) == 0
    app_clock.set(instant)
    assert release.release_due() == 1
    run_queue()
    assert len(twilio.messages) == 1


def test_a_held_flow_needs_the_window_open_when_it_starts(ctx, client, auth, twilio):
    _user(client, auth)  # wrote five minutes ago: the window closes in under 24 hours
    answer = client.post("/notify", json={"user_id": "ada", **FLOW, "quiet_hours": None,
                                          "send_at": rfc3339(utcnow() + timedelta(days=2))}, headers=auth)
    assert answer.status_code == 422 and "held until" in answer.get_json()["error"]


def test_an_idempotent_replay_of_a_scheduled_flow_answers_the_same(ctx, client, auth):
    _user(client, auth)
    body = {"user_id": "ada", **FLOW, "send_at": rfc3339(utcnow() + timedelta(hours=2))}
    first = client.post("/notify", json=body, headers=dict(auth, **{"Idempotency-Key": "flow-1"}))
    again = client.post("/notify", json=body, headers=dict(auth, **{"Idempotency-Key": "flow-1"}))
    assert first.status_code == again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["held_until"] == first.get_json()["held_until"]
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Conversation)) == 1
