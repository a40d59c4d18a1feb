"""The tasks a batch took along are dropped as they are dequeued, not run one by one (issue 17:
bot/delivery/queue.py, MaskedLogHuey.dequeue)."""
from __future__ import annotations

from bot.delivery import outbox, sender
from bot.delivery.queue import PriorityQueueStorage, huey
from bot.delivery.tasks import process_inbound
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import Direction, MessageStatus
from tests.conftest import make_contact


def _queued(count: int) -> list[str]:
    """`count` pending messages, each its own contact, their send tasks on the queue in order."""
    ids = []
    for i in range(count):
        row = Message(direction=Direction.OUTBOUND, contact_id=make_contact(f"+1555300{i:04d}").id, body=f"m{i}",
                      status=MessageStatus.PENDING, status_rank=MessageStatus.PENDING.rank)
        db.session.add(row)
        outbox.defer_send(row)
        db.session.commit()
        ids.append(row.id)
    return ids


def test_the_tasks_of_messages_a_batch_holds_are_dropped_in_one_look(app):
    with app.app_context():
        ids = _queued(6)
        process_inbound(ids[1], priority=int(outbox.Priority.BULK))  # another kind of task, same argument, last
        sender._own(ids[:4])  # a batch of this process took the first four along
        pops: list[int] = []
        storage = huey.storage
        popped = storage.dequeue

        def counted() -> bytes | None:
            pops.append(1)
            return popped()

        storage.dequeue = counted  # type: ignore[method-assign]
        try:
            task = huey.dequeue()
        finally:
            del storage.dequeue
        # The first message not held is the next to run; the four before it never ran.
        assert task is not None and task.args == (ids[4],)
        if isinstance(storage, PriorityQueueStorage):
            assert len(pops) == 2  # the first one held, one look behind it, then the one to run
        rest = []
        while (task := huey.dequeue()) is not None:
            rest.append((type(task).__name__, task.args[0]))
        # The inbound task of a held id is not a send: it still runs; the last send too.
        assert sorted(rest) == sorted([("process_inbound", ids[1]), ("send_message", ids[5])])
