"""The dashboard's pages over a day of real traffic (tests/dashboard/scenario.py): what each
shows, the filters, the keyset pages, the timeline, the failures explained, the events' replay,
the handoff inbox's reply and give-back, the conversations, and the health strip's figures,
which are /metrics' readings."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.extensions import db
from bot.metrics.readings import read_readings
from bot.models import Contact, Event, Message
from bot.vocabulary import Direction, EventStatus, Kind
from tests.conftest import run_queue
from tests.dashboard.scenario import ADA, GRACE, Day, make_day


@pytest.fixture
def day(app, twilio) -> Day:
    return make_day(app, twilio)


def test_the_log_is_newest_first_and_filters_by_error_code(signed_in, day):
    page = signed_in.get("/dashboard/").get_data(as_text=True)
    assert page.index("hello") > page.index("Your order #17 shipped")  # newest first
    failed = signed_in.get("/dashboard/?error_code=63016")
    text = failed.get_data(as_text=True)
    assert failed.status_code == 200
    assert day.failed_id in text and day.delivered_id not in text
    assert signed_in.get("/dashboard/?status=delivered").get_data(as_text=True).count(day.delivered_id) == 1


@pytest.mark.parametrize("query, shown, hidden", [
    ("phone=%2B15557654321", "Your invoice is ready", "Your order #17 shipped"),
    ("phone=whatsapp:%2B15551234567", "Your order #17 shipped", "Your invoice is ready"),
    ("channel=whatsapp&direction=inbound", "My bill is wrong", "Your invoice is ready"),
    ("status=failed", "Your order #17 shipped", "Your invoice is ready"),
])
def test_each_filter_narrows_the_log(signed_in, day, query, shown, hidden):
    text = signed_in.get(f"/dashboard/?{query}").get_data(as_text=True)
    assert shown in text and hidden not in text


def test_the_log_filters_by_flow_and_by_user(app, signed_in, day, client, auth):
    response = client.put("/users/u-42", json={"phone": "+15553334444"}, headers=auth)
    assert response.status_code in (200, 201), response.get_json()
    with app.app_context():
        contact = db.session.scalar(sa.select(Contact).where(Contact.user_id == "u-42"))
        db.session.add(Message(direction=Direction.OUTBOUND, contact_id=contact.id, body="for u-42 only",
                               status="sent", kind=Kind.NOTIFICATION))
        db.session.commit()
    text = signed_in.get("/dashboard/?user=u-42").get_data(as_text=True)
    assert "for u-42 only" in text and "Your invoice is ready" not in text
    welcome = signed_in.get("/dashboard/?flow=welcome")
    assert welcome.status_code == 200
    assert "for u-42 only" not in welcome.get_data(as_text=True)


def test_pages_of_the_log_follow_each_other_without_gaps_or_repeats(app, signed_in, operator):
    with app.app_context():
        contact = Contact(phone=ADA)
        db.session.add(contact)
        db.session.flush()
        start = utcnow() - timedelta(hours=1)
        for n in range(120):  # some share a created_at: the id breaks the tie
            db.session.add(Message(direction=Direction.OUTBOUND, contact_id=contact.id, body=f"number {n:03d}",
                                   status="sent", created_at=start + timedelta(seconds=n // 3)))
        db.session.commit()
    seen: list[str] = []
    path = "/dashboard/"
    while path:
        response = signed_in.get(path)
        text = response.get_data(as_text=True)
        seen += [line.split("number ")[1][:3] for line in text.splitlines() if "number " in line]
        marker = 'rel="next" href="'
        path = text.split(marker)[1].split('"')[0].replace("&amp;", "&") if marker in text else ""
    assert sorted(seen) == [f"{n:03d}" for n in range(120)]  # each once: no gap, no repeat
    seconds = [int(number) // 3 for number in seen]
    assert seconds == sorted(seconds, reverse=True)  # newest first across the pages


def test_a_message_page_shows_its_whole_timeline(signed_in, day):
    text = signed_in.get(f"/dashboard/messages/{day.failed_id}").get_data(as_text=True)
    for expected in ("created", "attempt 1 started", "accepted by the provider", "Twilio callback: sent",
                     "Twilio callback: failed", "event message.status", "Outside the 24-hour window",
                     "https://www.twilio.com/docs/api/errors/63016", "+15551234567", "Your order #17 shipped"):
        assert expected in text, expected
    assert text.index("Twilio callback: sent") < text.index("Twilio callback: failed")


def test_a_message_can_be_found_by_its_twilio_sid(app, signed_in, day):
    with app.app_context():
        sid = db.session.scalar(sa.select(Message.twilio_sid).where(Message.id == day.delivered_id))
    response = signed_in.get(f"/dashboard/sid/{sid}")
    assert response.status_code == 302 and response.headers["Location"].endswith(f"/dashboard/messages/{day.delivered_id}")
    assert signed_in.get("/dashboard/sid/SMnothing").status_code == 404


def test_the_fallback_a_failure_led_to_is_on_its_timeline(app, signed_in, client, auth, twilio):
    response = client.put("/users/u-7", json={"phone": ADA, "email": "ada@example.com"}, headers=auth)
    assert response.status_code in (200, 201)
    with app.app_context():
        db.session.execute(sa.update(Contact).where(Contact.phone == ADA).values(last_inbound_at=utcnow()))
        db.session.commit()
    first = client.post("/notify", json={"user_id": "u-7", "body": "Your code is 1234", "subject": "Code"},
                        headers=auth).get_json()["id"]
    run_queue()
    from tests.dashboard.scenario import _sid, _webhook
    from tests.conftest import status_form
    _webhook(app, status_form(_sid(app, first), "undelivered", error_code=63024, to=ADA))
    run_queue()
    with app.app_context():
        fallback = db.session.scalar(sa.select(Message).where(Message.fallback_of == first))
        assert fallback is not None and fallback.channel == "email"
        fallback_id = fallback.id
    text = signed_in.get(f"/dashboard/messages/{first}").get_data(as_text=True)
    assert "fallback on email" in text and f"/dashboard/messages/{fallback_id}" in text
    assert "fallback of an earlier message" in signed_in.get(f"/dashboard/messages/{fallback_id}").get_data(as_text=True)


def test_failures_are_grouped_by_code_explained_linked_and_trended(app, signed_in, day):
    with app.app_context():
        contact_id = db.session.scalar(sa.select(Contact.id).where(Contact.phone == ADA))
        for hours_ago in (3, 3, 20):  # when they failed: their last change
            failed_at = utcnow() - timedelta(hours=hours_ago, minutes=1)
            db.session.add(Message(direction=Direction.OUTBOUND, contact_id=contact_id, body="x", status="failed",
                                   error_code=63016, created_at=failed_at - timedelta(days=2), updated_at=failed_at))
        db.session.add(Message(direction=Direction.OUTBOUND, contact_id=contact_id, body="old", status="failed",
                               error_code=63049, updated_at=utcnow() - timedelta(hours=30)))
        db.session.commit()
    text = signed_in.get("/dashboard/failures").get_data(as_text=True)
    row = text[text.index('error_code=63016'):]
    row = row[:row.index("</tr>")]
    assert ">4<" in row  # the scenario's one and three more
    assert "Outside the 24-hour window" in row and "https://www.twilio.com/docs/api/errors/63016" in row
    from bot.dashboard.messages import failure_groups
    with app.app_context():
        [group] = [g for g in failure_groups() if g.error_code == 63016]
    assert sum(group.trend) == 4 and group.trend[-1] == 1 and group.trend[-4] == 2 and group.trend[-21] == 1
    assert "63049" not in text  # older than 24 h


def test_events_page_counts_the_backlog_and_replays_a_failed_event(app, signed_in, day):
    app.config["EVENTS_WEBHOOK_URL"] = "http://127.0.0.1:9/events"  # replay needs somewhere to deliver to
    page = signed_in.get("/dashboard/events").get_data(as_text=True)
    assert day.failed_event_id in page and "HTTP 503" in page
    response = signed_in.post(f"/dashboard/events/{day.failed_event_id}/replay")
    assert response.status_code == 302
    with app.app_context():
        event = db.session.scalar(sa.select(Event).where(Event.id == day.failed_event_id))
        assert (event.status, event.attempts, event.last_error) == (EventStatus.PENDING, 0, None)


def test_replay_without_a_receiver_or_of_an_unknown_event_says_why(app, signed_in, day):
    app.config["EVENTS_WEBHOOK_URL"] = None
    response = signed_in.post(f"/dashboard/events/{day.failed_event_id}/replay")
    assert response.status_code == 409 and "EVENTS_WEBHOOK_URL" in response.get_data(as_text=True)
    app.config["EVENTS_WEBHOOK_URL"] = "http://127.0.0.1:9/events"
    assert signed_in.post("/dashboard/events/" + "0" * 32 + "/replay").status_code == 404
    assert signed_in.post("/dashboard/events/not-an-id/replay").status_code == 404


def test_the_handoff_inbox_answers_as_the_operator_and_gives_back(app, signed_in, day, twilio):
    page = signed_in.get("/dashboard/handoff").get_data(as_text=True)
    assert "My bill is wrong" in page and f"contact-{day.handoff_contact_id}" in page
    response = signed_in.post(f"/dashboard/handoff/{day.handoff_contact_id}/reply",
                              {"body": "Hi Grace, I am looking at your bill now."})
    assert response.status_code == 302
    run_queue()
    sent = [m for m in twilio.messages if m["body"] == "Hi Grace, I am looking at your bill now."]
    assert [m["to"] for m in sent] == ["whatsapp:" + GRACE]
    with app.app_context():
        assert db.session.scalar(sa.select(Message.kind).where(Message.body == "Hi Grace, I am looking at your bill now.")) == Kind.AGENT
    response = signed_in.post(f"/dashboard/handoff/{day.handoff_contact_id}/end")
    assert response.status_code == 302
    with app.app_context():
        assert db.session.get(Contact, day.handoff_contact_id).handoff_until is None
        by = db.session.scalars(sa.select(Event.data).where(Event.type == "contact.handoff_ended")).all()
    assert [data["by"] for data in by] == ["operator"]
    assert "Nobody is waiting" in signed_in.get("/dashboard/handoff").get_data(as_text=True)


def test_conversations_by_flow_and_outcome(signed_in, day):
    text = signed_in.get("/dashboard/conversations").get_data(as_text=True)
    assert "welcome" in text


def test_the_health_strip_shows_the_metrics_readings(app, signed_in, day):
    with app.app_context():
        contact_id = db.session.scalar(sa.select(Contact.id).where(Contact.phone == ADA))
        db.session.add(Message(direction=Direction.OUTBOUND, contact_id=contact_id, body="waiting", status="pending",
                               created_at=utcnow() - timedelta(minutes=7)))
        db.session.commit()
        readings = read_readings(db.session)
    text = signed_in.get("/dashboard/").get_data(as_text=True)
    assert readings.oldest_pending_age >= 7 * 60
    assert 'id="health-oldest">7 min<' in text
    assert f'>{readings.events_waiting()} waiting, {readings.events_failed()} failed</a>' in text
    # Over five minutes waiting, and an event given up on: both in red; the database is fine.
    assert '<li class="bad">oldest waiting message' in text and '<li class="bad">events' in text
    assert '<li>database' in text
    assert readings.events_failed() == 1
    assert f'id="health-handoff">{readings.contacts_in_handoff}<' in text and readings.contacts_in_handoff == 1
    assert 'id="health-database">up<' in text
