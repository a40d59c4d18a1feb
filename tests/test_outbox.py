"""The outbox enqueues work only after the commit that makes its rows visible (invariant 1)."""
from __future__ import annotations

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
