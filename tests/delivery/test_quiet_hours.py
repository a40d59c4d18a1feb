"""Quiet hours through /notify, the database and the release (invariant 15): a notification that
would arrive inside them, in the user's own timezone, is held until they end, never dropped;
replies in a conversation the user started, opt-out confirmations and agents' messages never
wait; a daylight-saving change moves the release instant, not its wall-clock time."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from bot.clock import isoformat, utcnow
from bot.delivery import release
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import Kind
from tests.app_clock import app_clock  # noqa: F401 - the fixture
from tests.conftest import inbound_form, make_contact, run_queue

PHONE = "+15551234567"


def around(now: datetime, zone: str) -> tuple[str, datetime]:
    """Quiet hours from an hour before to an hour after `now` (naive UTC) on the clock of `zone`
    (spanning midnight if need be), and the instant (naive UTC) they end."""
    tz = ZoneInfo(zone)
    local = now.replace(tzinfo=timezone.utc).astimezone(tz)
    start, end = (local - timedelta(hours=1)), (local + timedelta(hours=1)).replace(second=0, microsecond=0)
    ends = end.astimezone(timezone.utc).replace(tzinfo=None)
    return f"{start:%H:%M}-{end:%H:%M}", ends


def notify_user(client, auth, user_id: str, **extra):
    answer = client.post("/notify", json={"user_id": user_id, "body": "your parcel is here", **extra}, headers=auth)
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()


def wrote_recently(user_id: str) -> None:
    from bot.conversations.users import find_user
    find_user(user_id).last_inbound_at = utcnow() - timedelta(minutes=5)
    db.session.commit()


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


@pytest.fixture
def user(ctx, client, auth):
    """A WhatsApp user in Tokyo who wrote five minutes ago."""
    client.put("/users/ada", json={"phone": PHONE, "timezone": "Asia/Tokyo"}, headers=auth)
    wrote_recently("ada")
    return "ada"


def test_a_notification_inside_quiet_hours_is_held_until_they_end_in_the_users_timezone(app, client, auth, twilio,
                                                                                        user, app_clock):  # noqa: F811
    quiet, ends = around(utcnow(), "Asia/Tokyo")
    app.config["QUIET_HOURS"] = quiet
    accepted = notify_user(client, auth, user)
    assert accepted["held_until"] == isoformat(ends) and accepted["held_reason"] == "quiet_hours"
    assert accepted["send_at"] is None
    run_queue()
    assert twilio.messages == []  # held, not dropped:
    assert client.get(accepted["url"], headers=auth).get_json()["status"] == "pending"
    assert release.release_due(ends - timedelta(seconds=1)) == 0
    app_clock.set(ends)  # they end: the send finds them over (it checks them again)
    assert release.release_due() == 1
    run_queue()
    assert [m["body"] for m in twilio.messages] == ["your parcel is here"]


def test_each_user_has_their_own_night(app, client, auth, twilio, user):
    # The quiet hours cover now in Tokyo; in Kolkata (3.5 h behind) it is well before them.
    quiet, _ = around(utcnow(), "Asia/Tokyo")
    app.config["QUIET_HOURS"] = quiet
    client.put("/users/bob", json={"phone": "+15557654321", "timezone": "Asia/Kolkata"}, headers=auth)
    wrote_recently("bob")
    assert notify_user(client, auth, user)["held_until"] is not None
    assert notify_user(client, auth, "bob")["held_until"] is None
    run_queue()
    assert [m["to"] for m in twilio.messages] == ["whatsapp:+15557654321"]


def test_a_user_without_a_timezone_has_the_default_one(ctx, app, client, auth, twilio):
    client.put("/users/cy", json={"phone": PHONE}, headers=auth)
    wrote_recently("cy")
    quiet, ends = around(utcnow(), "America/Sao_Paulo")
    app.config.update(QUIET_HOURS=quiet, DEFAULT_TIMEZONE="America/Sao_Paulo")
    assert notify_user(client, auth, "cy")["held_until"] == isoformat(ends)
    app.config["DEFAULT_TIMEZONE"] = "Asia/Kolkata"
    assert notify_user(client, auth, "cy")["held_until"] is None


def test_a_number_alone_has_the_default_timezone_and_a_users_number_its_own(app, client, auth, twilio, user):
    quiet, ends = around(utcnow(), "Asia/Tokyo")
    app.config.update(QUIET_HOURS=quiet, DEFAULT_TIMEZONE="Asia/Kolkata")
    answer = client.post("/notify", json={"to": PHONE, "body": "by number"}, headers=auth).get_json()
    assert answer["held_until"] == isoformat(ends)  # Ada's number: Tokyo
    make_contact("+15550001111")
    answer = client.post("/notify", json={"to": "+15550001111", "body": "stranger"}, headers=auth).get_json()
    assert answer["held_until"] is None  # Kolkata


def test_the_request_overrides_the_setting_and_null_turns_them_off(app, client, auth, twilio, user):
    quiet, ends = around(utcnow(), "Asia/Tokyo")
    app.config["QUIET_HOURS"] = quiet
    off = notify_user(client, auth, user, quiet_hours=None)
    assert off["held_until"] is None
    app.config["QUIET_HOURS"] = ""
    own = notify_user(client, auth, user, quiet_hours=quiet)
    assert own["held_until"] == isoformat(ends)
    run_queue()
    assert len(twilio.messages) == 1
    bad = client.post("/notify", json={"user_id": user, "body": "x", "quiet_hours": "22:00"}, headers=auth)
    assert bad.status_code == 400 and "'quiet_hours'" in bad.get_json()["error"]


def test_a_scheduled_time_inside_quiet_hours_waits_for_their_end(app, client, auth, user):
    # Quiet 21:00-08:00 Tokyo; send_at 23:00 Tokyo tomorrow -> 08:00 Tokyo the day after.
    app.config["QUIET_HOURS"] = "21:00-08:00"
    tokyo = ZoneInfo("Asia/Tokyo")
    local_tomorrow = (datetime.now(tokyo) + timedelta(days=1)).replace(hour=23, minute=0, second=0, microsecond=0)
    morning = (local_tomorrow + timedelta(days=1)).replace(hour=8)
    accepted = client.post("/notify", json={"user_id": user, "template": "order_update", "variables": {"1": "Ada"},
                                            "send_at": local_tomorrow.isoformat()}, headers=auth).get_json()
    assert accepted["held_until"] == isoformat(morning.astimezone(timezone.utc).replace(tzinfo=None))
    assert accepted["held_reason"] == "quiet_hours"


def test_replies_opt_out_confirmations_and_agents_are_never_held(app, client, auth, twilio, post_webhook, user):
    quiet, _ = around(utcnow(), "Asia/Tokyo")
    app.config["QUIET_HOURS"] = quiet
    assert post_webhook(inbound_form(PHONE, "hello")).status_code == 200
    run_queue()
    assert post_webhook(inbound_form(PHONE, "STOP")).status_code == 200
    run_queue()
    rows = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")).all()
    assert {row.kind for row in rows} >= {Kind.REPLY, Kind.OPT_OUT_CONFIRMATION}
    assert all(row.not_before is None for row in rows)
    assert len(twilio.messages) == len(rows)  # every one of them left at once
    # An agent answering during the quiet hours (after an opt-in) is not held either.
    assert post_webhook(inbound_form(PHONE, "START")).status_code == 200
    run_queue()
    agent = notify_user(client, auth, user, agent="Grace")
    assert agent["held_until"] is None


def test_quiet_hours_across_the_berlin_spring_forward_hold_and_release_at_the_right_instant(
        ctx, app, client, auth, twilio, app_clock):  # noqa: F811
    """2026-03-28, 22:30 in Berlin (21:30 UTC): quiet 21:00-08:00 holds the notification until
    08:00 summer time on the 29th, 06:00 UTC (the clocks jumped at 02:00, the night is 9.5 h),
    and the release sends it at that instant, not a second before."""
    client.put("/users/dora", json={"phone": PHONE, "timezone": "Europe/Berlin"}, headers=auth)
    wrote_recently("dora")
    app.config["QUIET_HOURS"] = "21:00-08:00"
    evening = datetime(2026, 3, 28, 21, 30)
    app_clock.set(evening)  # the request's clock: that evening
    accepted = notify_user(client, auth, "dora")
    release_instant = datetime(2026, 3, 29, 6, 0)
    assert accepted["held_until"] == "2026-03-29T06:00:00Z" == isoformat(release_instant)
    huey.flush()  # the queue's hint would run now, the evening long gone: the database decides
    assert release.release_due(evening + timedelta(hours=8)) == 0  # 07:30 summer time: still quiet
    assert release.release_due(release_instant - timedelta(seconds=1)) == 0
    assert twilio.messages == []
    app_clock.set(release_instant)
    assert release.release_due() == 1
    run_queue()
    assert [m["body"] for m in twilio.messages] == ["your parcel is here"]


def test_quiet_hours_across_a_sao_paulo_fall_back(ctx, app, client, auth, twilio, app_clock):  # noqa: F811
    """2019-02-16, 23:30 -02 in Sao Paulo (01:30 UTC on the 17th); at midnight the clocks went
    back to 23:00 -03: quiet 21:00-08:00 ends at 08:00 -03, 11:00 UTC (a night an hour longer)."""
    client.put("/users/eva", json={"phone": PHONE, "timezone": "America/Sao_Paulo"}, headers=auth)
    wrote_recently("eva")
    app_clock.set(datetime(2019, 2, 17, 1, 30))
    accepted = notify_user(client, auth, "eva", quiet_hours="21:00-08:00")
    assert accepted["held_until"] == "2019-02-17T11:00:00Z"
    huey.flush()
    assert release.release_due(datetime(2019, 2, 17, 10, 59, 59)) == 0
    app_clock.set(datetime(2019, 2, 17, 11, 0))
    assert release.release_due() == 1
    run_queue()
    assert len(twilio.messages) == 1
