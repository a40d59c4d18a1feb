"""One contact, one message at a time outbound, in order (invariant 9)."""
from __future__ import annotations

import sqlalchemy as sa

from bot.delivery import claims, sender
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import MessageStatus
from tests.conftest import make_contact, run_queue

PHONE = "+15551234567"


def _notify(client, auth, body: str, to: str = PHONE) -> str:
    response = client.post("/notify", json={"to": to, "body": body}, headers=auth)
    assert response.status_code == 202
    return response.get_json()["id"]


def test_a_later_message_waits_for_the_one_before_and_follows_it(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        first, second = _notify(client, auth, "first"), _notify(client, auth, "second")
        first_task, second_task = huey.dequeue(), huey.dequeue()
        assert first_task.args == (first,) and second_task.args == (second,)
        # A second worker reaches the later message first: it must wait, not overtake.
        assert sender.deliver(second) == sender.Outcome.WAITING
        assert twilio.messages == []
        huey.execute(first_task)  # the first goes, and hands the turn to the second
        run_queue()
        assert [m["body"] for m in twilio.messages] == ["first", "second"]
        db.session.expire_all()
        assert db.session.get(Message, second).status == MessageStatus.QUEUED


def test_a_burst_to_one_contact_leaves_in_creation_order_whatever_order_the_tasks_run(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        ids = [_notify(client, auth, f"m{i}") for i in range(6)]
        tasks = []
        while (task := huey.dequeue()) is not None:
            tasks.append(task)
        for task in reversed(tasks):  # the worst order: newest first
            huey.execute(task)
        run_queue()
        assert [m["body"] for m in twilio.messages] == [f"m{i}" for i in range(6)]
        db.session.expire_all()
        assert {db.session.get(Message, i).status for i in ids} == {MessageStatus.QUEUED}


def test_other_contacts_do_not_wait(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        make_contact("+15557654321")
        ada = _notify(client, auth, "to Ada")
        other = _notify(client, auth, "to Bob", to="+15557654321")
        assert claims.claim(ada) is not None  # Ada's message is held by a stalled worker
        assert sender.deliver(other) == sender.Outcome.SENT
        assert [m["body"] for m in twilio.messages] == ["to Bob"]


def test_a_failed_message_hands_the_turn_on(app, client, auth, twilio):
    with app.app_context():
        make_contact(PHONE)
        twilio.fail_next(400, 21211, "invalid 'To' number")  # permanent: fails at once
        first, second = _notify(client, auth, "first"), _notify(client, auth, "second")
        first_task, _ = huey.dequeue(), huey.dequeue()
        assert sender.deliver(second) == sender.Outcome.WAITING
        huey.execute(first_task)
        run_queue()
        db.session.expire_all()
        assert db.session.get(Message, first).status == MessageStatus.FAILED
        assert [m["body"] for m in twilio.messages] == ["second"]


def test_a_step_with_two_replies_keeps_their_order(app):
    """Replies built together get strictly increasing creation times (the order they leave in)."""
    from bot.conversations.replies import build_messages
    from bot.models import Contact
    from flows.toolkit import Reply

    with app.app_context():
        contact = make_contact(PHONE)
        rows = build_messages([Reply("common/help"), Reply("common/greeting", {"name": "Ada"}),
                               Reply("common/not_understood")], db.session.get(Contact, contact.id))
        times = [row.created_at for row in rows]
        assert times == sorted(times) and len(set(times)) == 3
        more = build_messages([Reply("common/help")], db.session.get(Contact, contact.id))
        assert more[0].created_at > times[-1]
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0
