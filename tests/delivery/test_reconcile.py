"""Reconciliation: a lost status callback never leaves a message `sent` forever (invariant 3).

Messages are sent through the real SDK to the simulator, which then moves them on without posting
callbacks (`set_status`: the callbacks are lost); the job asks it with `messages(sid).fetch()`.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import reconcile, tasks
from bot.extensions import db
from bot.models import Message, PeriodicRun, StatusEvent
from tests.conftest import make_contact, run_queue

#: Past RECONCILE_AFTER_MINUTES (180 by default) for a message sent now.
LATER = timedelta(hours=4)


def send(app, client, auth, count: int = 1) -> list[tuple[str, str]]:
    """`count` notifications sent through the simulator: [(message id, Twilio SID)]."""
    ids = []
    with app.app_context():
        for i in range(count):
            make_contact(f"+1555300{i:04d}")
    for i in range(count):
        response = client.post("/notify", json={"to": f"+1555300{i:04d}", "body": f"note {i}"}, headers=auth)
        assert response.status_code == 202
        ids.append(response.get_json()["id"])
    run_queue()
    with app.app_context():
        return [(message_id, db.session.get(Message, message_id).twilio_sid) for message_id in ids]


def run(app, when=None) -> dict[str, int]:
    with app.app_context():
        return reconcile.reconcile(now=when or utcnow() + LATER)


def message(app, message_id: str) -> Message:
    with app.app_context():
        return db.session.get(Message, message_id)


def fetches(twilio) -> int:
    return sum(1 for r in twilio.requests if r["method"] == "GET" and "/Messages/" in r["path"])


def test_a_lost_callback_is_learnt_from_twilio_as_a_status_event(app, client, auth, twilio):
    [(message_id, sid)] = send(app, client, auth)
    twilio.set_status(sid, "delivered")
    assert run(app) == {"asked": 1, "learnt": 1, "errors": 0}
    row = message(app, message_id)
    assert row.status == "delivered" and row.reconciled_at is not None
    with app.app_context():
        [event] = db.session.scalars(sa.select(StatusEvent)).all()
    assert (event.status, event.message_id) == ("delivered", message_id)
    assert event.payload["source"] == "reconciliation"


def test_the_error_code_twilio_reports_is_kept(app, client, auth, twilio):
    [(message_id, sid)] = send(app, client, auth)
    twilio.set_status(sid, "undelivered", error_code=30003)
    run(app)
    row = message(app, message_id)
    assert (row.status, row.error_code) == ("undelivered", 30003)


def test_the_status_never_moves_down(app, client, auth, twilio):
    [(message_id, sid)] = send(app, client, auth)
    with app.app_context():
        db.session.execute(sa.update(Message).values(status="sent", status_rank=5))
        db.session.commit()
    twilio.set_status(sid, "queued")  # Twilio's view lags ours (a callback raced the fetch)
    run(app)
    assert message(app, message_id).status == "sent"


def test_only_messages_that_sat_long_enough_and_are_not_too_old_are_asked(app, client, auth, twilio):
    rows = send(app, client, auth, count=5)
    (young, _), (old, _), (final, _), (recent, _), (due, due_sid) = rows
    now = utcnow()
    with app.app_context():
        db.session.execute(sa.update(Message).where(Message.id != young).values(updated_at=now - LATER))
        db.session.execute(sa.update(Message).where(Message.id == old).values(created_at=now - timedelta(days=4)))
        db.session.execute(sa.update(Message).where(Message.id == final).values(status="delivered", status_rank=6))
        db.session.execute(sa.update(Message).where(Message.id == recent).values(reconciled_at=now - timedelta(hours=1)))
        db.session.commit()
    for _, sid in rows:
        twilio.set_status(sid, "read")
    assert run(app, when=now)["asked"] == 1
    assert fetches(twilio) == 1
    assert message(app, due).status == "read"
    assert message(app, young).status == message(app, recent).status == "queued"


def test_a_run_asks_at_most_the_batch_and_the_rest_next_time(app, client, auth, twilio, monkeypatch):
    rows = send(app, client, auth, count=3)
    monkeypatch.setattr(reconcile, "BATCH", 2)
    for _, sid in rows:
        twilio.set_status(sid, "delivered")
    assert run(app)["asked"] == 2
    assert run(app)["asked"] == 1
    assert {message(app, message_id).status for message_id, _ in rows} == {"delivered"}


def test_a_twilio_error_is_logged_and_the_message_asked_again_in_a_later_run(app, client, auth, twilio, caplog):
    [(message_id, sid)] = send(app, client, auth)
    twilio.set_status(sid, "delivered")
    twilio.fail_next_fetch(500, 20500)
    when = utcnow() + LATER
    assert run(app, when) == {"asked": 0, "learnt": 0, "errors": 1}
    assert "fetching " + sid + " failed" in caplog.text
    assert message(app, message_id).status == "queued"
    assert run(app, when + timedelta(minutes=5))["asked"] == 0  # not hammered at every run
    assert run(app, when + timedelta(minutes=11)) == {"asked": 1, "learnt": 1, "errors": 0}
    assert message(app, message_id).status == "delivered"


def test_twilio_down_ends_the_run_early_without_raising(app, client, auth, twilio):
    send(app, client, auth, count=5)
    twilio.fail_next_fetch(503, 20503, times=5)
    assert run(app)["errors"] == reconcile.MAX_ERRORS_IN_A_ROW
    assert fetches(twilio) == reconcile.MAX_ERRORS_IN_A_ROW


def test_the_periodic_job_takes_one_turn_across_consumers(app, client, auth, twilio):
    [(message_id, sid)] = send(app, client, auth)
    twilio.set_status(sid, "read")
    with app.app_context():
        db.session.execute(sa.update(Message).values(updated_at=utcnow() - LATER))
        db.session.commit()
    tasks.reconcile_statuses.call_local()
    tasks.reconcile_statuses.call_local()  # a second consumer's scheduler, the same minute
    assert message(app, message_id).status == "read"
    assert fetches(twilio) == 1
    with app.app_context():
        assert db.session.get(PeriodicRun, "reconcile_statuses") is not None


@pytest.mark.parametrize("status, code", [("failed", 63016), ("canceled", None)])
def test_final_statuses_twilio_reports_end_the_asking(app, client, auth, twilio, status, code):
    [(message_id, sid)] = send(app, client, auth)
    twilio.set_status(sid, status, error_code=code)
    run(app)
    assert (message(app, message_id).status, message(app, message_id).error_code) == (status, code)
    assert run(app, utcnow() + 2 * LATER)["asked"] == 0  # final: never asked again


def test_the_wait_before_asking_is_a_setting(app, client, auth, twilio):
    app.config["RECONCILE_AFTER_MINUTES"] = 10
    [(message_id, sid)] = send(app, client, auth)
    twilio.set_status(sid, "delivered")
    assert run(app, utcnow() + timedelta(minutes=5))["asked"] == 0
    assert run(app, utcnow() + timedelta(minutes=11))["asked"] == 1
