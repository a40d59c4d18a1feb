"""The transactional outbox: enqueue only committed rows, and sweep up what the queue lost.

Rows are committed first and enqueued second. If the enqueue fails (Redis down) or a worker dies
mid-task, the row is still in the database, and `sweep` puts it back on the queue.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa

from bot.clock import utcnow
from bot.extensions import db
from bot.models import Conversation, ConversationStatus, Direction, Message, PeriodicRun, StatusEvent
from bot.delivery.statuses import apply_pending_events

log = logging.getLogger(__name__)

#: A pending row younger than this is assumed to be on the queue already.
STALE_AFTER = timedelta(seconds=60)
#: After the sweep enqueues a row, it leaves it alone this long: in a long backlog the row is
#: still waiting on the queue, and re-enqueueing it every minute would only grow the backlog.
REENQUEUE_AFTER = timedelta(minutes=5)


def _enqueue(task_name: str, row_id: str) -> bool:
    """Enqueue a task for a committed row; False (logged) if the queue is down.

    Any broker failure is swallowed on purpose: the row is safe in the database and the sweep
    enqueues it later, so the caller can still answer its request.
    """
    from bot.delivery import tasks

    try:
        getattr(tasks, task_name)(row_id)
        return True
    except Exception:
        log.exception("could not enqueue %s(%s); the outbox sweep will retry", task_name, row_id)
        return False


def enqueue_send(message_id: str) -> bool:
    """Put a committed outbound message on the queue."""
    return _enqueue("send_message", message_id)


def enqueue_inbound(message_id: str) -> bool:
    """Put a committed inbound message on the queue."""
    return _enqueue("process_inbound", message_id)


def enqueue_conversation_start(conversation_id: str) -> bool:
    """Put a committed backend-started conversation on the queue."""
    return _enqueue("start_conversation", conversation_id)


def take_periodic_turn(name: str, interval_seconds: int) -> bool:
    """Whether this consumer should run periodic job `name` now.

    Every consumer's scheduler enqueues periodic tasks, so with several worker dynos the job would
    run once per consumer. A conditional UPDATE on a shared row lets exactly one run per interval.
    """
    now = utcnow()
    took = db.session.execute(
        sa.update(PeriodicRun)
        .where(PeriodicRun.name == name, PeriodicRun.last_run_at <= now - timedelta(seconds=interval_seconds))
        .values(last_run_at=now)
    ).rowcount
    if not took:
        if db.session.get(PeriodicRun, name) is None:
            db.session.add(PeriodicRun(name=name, last_run_at=now))
            try:
                db.session.commit()
                return True
            except sa.exc.IntegrityError:  # another consumer created it first: its turn
                db.session.rollback()
                return False
        db.session.rollback()
        return False
    db.session.commit()
    return True


def sweep(now=None) -> dict[str, int]:
    """Re-enqueue stuck rows and apply orphaned status events. Returns counts, for logs and tests."""
    now = now or utcnow()
    stale = now - STALE_AFTER
    pending = db.session.scalars(
        sa.select(Message.id).where(
            Message.direction == Direction.OUTBOUND,
            sa.or_(
                # never enqueued, or the queue lost it
                sa.and_(Message.status == "pending", Message.next_attempt_at.is_(None), Message.created_at <= stale),
                # enqueued by an earlier sweep that long ago
                sa.and_(Message.status == "pending", Message.next_attempt_at <= now),
                # a transient failure's next attempt is due (and no sweep enqueued it lately)
                sa.and_(Message.status == "retrying", Message.next_attempt_at <= now,
                        sa.or_(Message.claimed_until.is_(None), Message.claimed_until < now)),
                # the worker died mid-send and its lease ran out
                sa.and_(Message.status == "dispatching", Message.claimed_until < now),
            ),
        ).order_by(Message.created_at).limit(1000)
    ).all()
    inbound = db.session.scalars(
        sa.select(Message.id).where(
            Message.direction == Direction.INBOUND, Message.status == "received", Message.updated_at <= stale
        ).order_by(Message.created_at).limit(1000)
    ).all()
    starting = db.session.scalars(
        sa.select(Conversation.id).where(
            Conversation.status == ConversationStatus.STARTING, Conversation.updated_at <= stale
        ).order_by(Conversation.started_at).limit(1000)
    ).all()
    orphan_sids = db.session.scalars(
        # A day bounds the search: callbacks for messages some other system sent never match.
        sa.select(StatusEvent.twilio_sid)
        .where(StatusEvent.message_id.is_(None), StatusEvent.received_at >= now - timedelta(days=1))
        .distinct().limit(1000)
    ).all()
    if pending:
        # Leave them alone for a while. A pending row's due time moves on; a retrying row's due
        # time must stay (its task may claim it only once due), so its claim column, unused while
        # retrying, notes the enqueue instead.
        db.session.execute(
            sa.update(Message).where(Message.id.in_(pending), Message.status == "pending")
            .values(next_attempt_at=now + REENQUEUE_AFTER).execution_options(synchronize_session=False))
        db.session.execute(
            sa.update(Message).where(Message.id.in_(pending), Message.status == "retrying")
            .values(claimed_until=now + REENQUEUE_AFTER).execution_options(synchronize_session=False))
    db.session.commit()

    for message_id in pending:
        enqueue_send(message_id)
    for message_id in inbound:
        enqueue_inbound(message_id)
    for conversation_id in starting:
        enqueue_conversation_start(conversation_id)
    applied = sum(1 for sid in orphan_sids if apply_pending_events(sid))
    counts = {"outbound": len(pending), "inbound": len(inbound), "conversations": len(starting), "events": applied}
    if any(counts.values()):
        log.info("outbox sweep: %s", counts)
    return counts
