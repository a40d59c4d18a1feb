"""The outbox enqueues work only after the commit that makes its rows visible (invariant 1)."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from bot.delivery import outbox
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import Direction, MessageStatus
from tests.conftest import make_contact


def _pending_row(contact_id: int) -> Message:
    return Message(direction=Direction.OUTBOUND, contact_id=contact_id, body="hi",
                   status=MessageStatus.PENDING, status_rank=MessageStatus.PENDING.rank)


def _deferred_send() -> Message:
    """A new pending message in the session, its send deferred, nothing committed yet."""
    row = _pending_row(make_contact().id)
    db.session.add(row)
    outbox.defer_send(row)
    return row


def _queued_ids() -> list[str]:
    ids = []
    while (task := huey.dequeue()) is not None:
        ids.append(task.args[0])
    return ids


def test_deferred_work_waits_for_the_commit(app):
    with app.app_context():
        row = _deferred_send()
        db.session.flush()
        assert huey.pending_count() == 0  # flushed is not committed
        db.session.commit()
        assert _queued_ids() == [row.id]


def test_a_rolled_back_row_is_never_enqueued(app):
    with app.app_context():
        _deferred_send()
        db.session.flush()
        db.session.rollback()
        db.session.commit()  # a later commit of the same session enqueues nothing either
        assert huey.pending_count() == 0
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0


def test_a_row_of_a_rolled_back_savepoint_is_skipped_and_the_rest_goes(app):
    with app.app_context():
        kept = _deferred_send()
        try:
            with db.session.begin_nested():
                lost = _pending_row(kept.contact_id)
                db.session.add(lost)
                outbox.defer_send(lost)
                db.session.flush()
                raise RuntimeError("the flow failed")
        except RuntimeError:
            pass
        assert huey.pending_count() == 0  # the savepoint's end is not the commit
        db.session.commit()
        assert _queued_ids() == [kept.id]


def test_a_queue_that_is_down_does_not_fail_the_commit(app, monkeypatch):
    def broker_down(*args, **kwargs):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(huey.storage, "enqueue", broker_down)
    with app.app_context():
        row = _deferred_send()
        db.session.commit()  # logged; the sweep sends it later
        assert db.session.get(Message, row.id).status == MessageStatus.PENDING


def test_a_person_writing_goes_ahead_of_a_broadcast(app, client, auth, post_webhook):
    """Invariant 13: with bulk notifications already queued, someone's message and the bot's
    reply to it are taken first (two lanes, on SQLite and on Redis alike)."""
    from tests.conftest import inbound_form

    with app.app_context():
        for i in range(5):
            make_contact(f"+1555000100{i}")
        make_contact("+15551234567")
    for i in range(5):
        assert client.post("/notify", json={"to": f"+1555000100{i}", "body": "Sale!"}, headers=auth).status_code == 202
    assert post_webhook(inbound_form("+15551234567", "HELP")).status_code == 200

    turn = huey.dequeue()
    assert turn.name.endswith("process_inbound")
    huey.execute(turn)  # the engine answers HELP: its reply is queued behind five notifications
    reply = huey.dequeue()
    assert reply.name.endswith("send_message")
    with app.app_context():
        row = db.session.get(Message, reply.args[0])
        assert (row.kind, row.contact.phone) == ("reply", "+15551234567")
    rest = [huey.dequeue() for _ in range(5)]
    with app.app_context():
        assert {db.session.get(Message, task.args[0]).kind for task in rest} == {"notification"}
    assert huey.dequeue() is None


def test_send_priority_follows_the_kind():
    assert outbox.send_priority("reply") > outbox.send_priority("notification")
    assert outbox.send_priority("opt_out_confirm") == outbox.Priority.CONVERSATION
    assert outbox.send_priority(None) == outbox.Priority.BULK


def test_a_task_costs_the_queue_one_round_trip_no_revocation_checks(app, client, auth, twilio, monkeypatch):
    """Issue 17: huey asks its storage, for every task it runs, whether the task was revoked,
    and clears its revocation flag after: two round trips beside the dequeue. Nothing here
    revokes a task (a message is stopped in its row), so the worker skips both, and revoking is
    refused rather than silently ignored."""
    from tests.conftest import run_queue

    with app.app_context():
        make_contact()
    asked: list[str] = []
    for name in ("peek_many", "peek_data", "pop_data", "delete_data", "put_data"):
        original = getattr(huey.storage, name)
        monkeypatch.setattr(huey.storage, name,
                            lambda *args, _name=name, _original=original, **kwargs: (asked.append(_name),
                                                                                     _original(*args, **kwargs))[1])
    response = client.post("/notify", json={"to": "+15551234567", "body": "one round trip"}, headers=auth)
    assert response.status_code == 202
    assert run_queue() >= 1
    assert [m["body"] for m in twilio.messages] == ["one round trip"]
    assert asked == []
    with pytest.raises(NotImplementedError):
        huey.revoke_by_id("anything")
