"""The transactional outbox: work is enqueued only once the rows it needs are committed.

Callers never write "commit, then enqueue": they `defer` the work on the session, and the
session's `after_commit` event enqueues it (docs/ARCHITECTURE.md, invariant 1). A transaction
that rolls back enqueues nothing, and a row added in a savepoint that rolled back is skipped. If an
enqueue fails (Redis down) or a worker dies mid-task, the row is still in the database, and
`sweep` puts it back on the queue.

The outbox knows the tasks only by the kind of work (`Work`); `bot.delivery.tasks` registers
how each is enqueued, so this module imports no task and no task imports lead back here in a loop.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from enum import IntEnum, StrEnum
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.orm import InstanceState, Session

from bot.clock import utcnow
from bot.extensions import db
from bot.models import Conversation, Message, PeriodicRun, new_id
from bot.vocabulary import Channel, ConversationStatus, Direction, Kind, MessageStatus

log = logging.getLogger(__name__)

#: A pending row younger than this is assumed to be on the queue already.
STALE_AFTER = timedelta(seconds=60)
#: After the sweep enqueues a row, it leaves it alone this long: in a long backlog the row is
#: still waiting on the queue, and re-enqueueing it every minute would only grow the backlog.
REENQUEUE_AFTER = timedelta(minutes=5)


class Work(StrEnum):
    """The kinds of deferred work, each one task taking one row id."""

    SEND = "send_message"
    INBOUND = "process_inbound"
    CONVERSATION_START = "start_conversation"
    EVENT = "deliver_event"
    BROADCAST = "pump_broadcast"


class Priority(IntEnum):
    """Lanes on the queue (higher first): someone in a conversation waits for the bot, a bulk
    notification can wait for them, and an email backlog waits behind WhatsApp's, so email never
    slows WhatsApp (docs/ARCHITECTURE.md, invariant 16). Emails still ride along in every batch
    (claims.claim_along fills a batch's spare places with the other channel's due messages).
    A broadcast's messages, on either channel, wait behind every other lane: a 100,000-recipient
    broadcast never holds back a transactional /notify (docs/delivery.md, "Broadcasts")."""

    BROADCAST = -10
    #: A broadcast's pump turns (bot/broadcasts/pump.py) go ahead of its own sends, so expanding
    #: its audience never waits behind the window it released.
    BROADCAST_PUMP = -9
    EMAIL = -5
    BULK = 0
    CONVERSATION = 10


#: Outbound kinds that answer someone who just wrote; every other outbound message is bulk.
CONVERSATION_KINDS = frozenset({Kind.REPLY, Kind.OPT_OUT_CONFIRMATION, Kind.AGENT})


def send_priority(kind: str | None, channel: str | None = None) -> Priority:
    """The queue lane of an outbound message of this kind, on this channel (when known)."""
    if kind in CONVERSATION_KINDS:
        return Priority.CONVERSATION
    if kind == Kind.BROADCAST:
        return Priority.BROADCAST
    return Priority.EMAIL if channel == Channel.EMAIL else Priority.BULK


_enqueuers: dict[Work, Callable[..., Any]] = {}
#: Key in `Session.info` of the work waiting for the session's commit.
_DEFERRED = "outbox_deferred"
#: Key in `Session.info`: this transaction's sends go to this process's sender after the commit.
_HAND_OVER = "outbox_hand_over"
#: Takes a committed message's send at once in this process (True), or declines (False: queue it).
_hand_over: Callable[[str, Priority], bool] | None = None


def register(work: Work, enqueue: Callable[..., Any]) -> None:
    """Tell the outbox how to enqueue `work` (bot.delivery.tasks registers its tasks here)."""
    _enqueuers[work] = enqueue


def register_hand_over(take: Callable[[str, "Priority"], bool]) -> None:
    """Tell the outbox who takes a send at once in this process (the tasks module registers the
    sender's `take_at_once`)."""
    global _hand_over
    _hand_over = take


def hand_over_sends() -> None:
    """The sends deferred in this transaction go straight to this process's sender once it
    commits, where the sender can take them at once, instead of a trip through the queue (a turn
    in the worker: its replies). Declined ones are enqueued as usual. A message handed over is
    committed `pending` first like any other: should the worker die before it leaves, the sweep
    finds it (invariant 1; docs/ARCHITECTURE.md, "The turn")."""
    db.session().info[_HAND_OVER] = True


def defer(work: Work, row: Any, priority: Priority = Priority.BULK, at: datetime | None = None) -> None:
    """Enqueue `work` for `row` when the current transaction commits; never if it rolls back.

    `row` is a model instance in the session (its id is assigned now if it has none yet) or the
    id of a row already committed. `at` (naive UTC): run it then rather than now, a hint only
    (a held message waits in the database: bot/delivery/release.py finds it without the queue).
    """
    if isinstance(row, str):
        row_id, state = row, None
    else:
        if row.id is None:
            row.id = new_id()  # known before the flush, so the work can name it
        row_id, state = row.id, sa.inspect(row)
    db.session().info.setdefault(_DEFERRED, []).append((work, row_id, state, priority, at))


def defer_send(message: Message | str, kind: str | None = None, at: datetime | None = None) -> None:
    """Send an outbound message once it is committed (ahead of bulk ones if it is a reply).

    `kind`: the message's kind, when `message` is only its id. `at`: a held message's time
    (its task is scheduled for then: a hint, the release check is the guarantee).
    """
    if isinstance(message, str):
        defer(Work.SEND, message, send_priority(kind), at)
    else:
        defer(Work.SEND, message, send_priority(message.kind, message.channel), at)


def defer_inbound(message: Message | str) -> None:
    """Run an inbound message through the engine once it is committed: someone waits for it."""
    defer(Work.INBOUND, message, Priority.CONVERSATION)


def defer_conversation_start(conversation: Conversation | str, at: datetime | None = None) -> None:
    """Start a backend-started conversation once it is committed (bulk: nobody wrote yet). `at`:
    a held one's time (a hint, as for a held message: the release check is the guarantee)."""
    defer(Work.CONVERSATION_START, conversation, Priority.BULK, at)


def enqueue(work: Work, row_id: str, priority: Priority = Priority.BULK, delay: timedelta | None = None) -> bool:
    """Enqueue a task for a committed row, now or after `delay` (a retry's backoff); False
    (logged) if the queue is down.

    Any broker failure is swallowed on purpose: the row is safe in the database and the sweep
    enqueues it later, so the caller can still answer its request.
    """
    task = _enqueuers[work]
    try:
        if delay is None:
            task(row_id, priority=int(priority))
        else:
            task.schedule(args=(row_id,), delay=max(delay.total_seconds(), 0), priority=int(priority))
        return True
    except Exception:
        log.exception("could not enqueue %s(%s); the outbox sweep will retry", work.value, row_id)
        return False


@sa.event.listens_for(Session, "after_commit")
def _enqueue_committed(session: Session) -> None:
    # The event fires for savepoints too; only the outermost commit makes the rows visible.
    if session.in_nested_transaction():
        return
    hand_over = session.info.pop(_HAND_OVER, False) and _hand_over is not None
    for work, row_id, state, priority, at in session.info.pop(_DEFERRED, ()):
        if state is not None and not _committed(state):
            continue  # added in a savepoint that rolled back
        if hand_over and at is None and work == Work.SEND and _hand_over(row_id, priority):
            continue
        enqueue(work, row_id, priority, None if at is None else at - utcnow())


@sa.event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    # A savepoint's rollback leaves the rest of the transaction's work standing (its own rows
    # are no longer in the session, which `_committed` sees); the outermost one drops it all.
    if not session.in_nested_transaction():
        session.info.pop(_DEFERRED, None)
        session.info.pop(_HAND_OVER, None)


def _committed(state: InstanceState) -> bool:
    return state.persistent or state.detached


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
    """Re-enqueue stuck rows. Returns counts, for logs and tests. (Status events a race left
    unlinked are applied by `statuses.apply_orphan_events`, run by the same periodic task.)"""
    now = now or utcnow()
    stale = now - STALE_AFTER
    pending = db.session.execute(
        sa.select(Message.id, Message.kind).where(
            Message.direction == Direction.OUTBOUND,
            sa.or_(
                # never enqueued, or the queue lost it (a row held for later is the release's:
                # bot/delivery/release.py; invariant 15)
                sa.and_(Message.status == MessageStatus.PENDING, Message.next_attempt_at.is_(None),
                        Message.created_at <= stale, Message.not_before.is_(None)),
                # enqueued by an earlier sweep that long ago
                sa.and_(Message.status == MessageStatus.PENDING, Message.next_attempt_at <= now,
                        Message.not_before.is_(None)),
                # a transient failure's next attempt is due (and no sweep enqueued it lately)
                sa.and_(Message.status == MessageStatus.RETRYING, Message.next_attempt_at <= now,
                        sa.or_(Message.claimed_until.is_(None), Message.claimed_until < now)),
                # the worker died mid-send and its lease ran out
                sa.and_(Message.status == MessageStatus.DISPATCHING, Message.claimed_until < now),
            ),
        ).order_by(Message.created_at).limit(1000)
    ).all()
    pending_ids = [row.id for row in pending]
    # Inbound rows and starting conversations get the same hold-off as pending messages: never
    # enqueued (or lost) and a minute old, or due again after an earlier sweep or a failed turn.
    inbound = db.session.scalars(
        sa.select(Message.id).where(
            Message.direction == Direction.INBOUND, Message.status == MessageStatus.RECEIVED,
            sa.or_(sa.and_(Message.next_attempt_at.is_(None), Message.updated_at <= stale),
                   Message.next_attempt_at <= now),
        ).order_by(Message.created_at).limit(1000)
    ).all()
    starting = db.session.scalars(
        sa.select(Conversation.id).where(
            Conversation.status == ConversationStatus.STARTING, Conversation.not_before.is_(None),
            sa.or_(sa.and_(Conversation.next_attempt_at.is_(None), Conversation.updated_at <= stale),
                   Conversation.next_attempt_at <= now),
        ).order_by(Conversation.started_at).limit(1000)
    ).all()
    if pending:
        # Leave them alone for a while. A pending row's due time moves on; a retrying row's due
        # time must stay (its task may claim it only once due), so its claim column, unused while
        # retrying, notes the enqueue instead.
        db.session.execute(
            sa.update(Message).where(Message.id.in_(pending_ids), Message.status == MessageStatus.PENDING)
            .values(next_attempt_at=now + REENQUEUE_AFTER).execution_options(synchronize_session=False))
        db.session.execute(
            sa.update(Message).where(Message.id.in_(pending_ids), Message.status == MessageStatus.RETRYING)
            .values(claimed_until=now + REENQUEUE_AFTER).execution_options(synchronize_session=False))
    if inbound:
        db.session.execute(
            sa.update(Message).where(Message.id.in_(inbound), Message.status == MessageStatus.RECEIVED)
            .values(next_attempt_at=now + REENQUEUE_AFTER).execution_options(synchronize_session=False))
    if starting:
        db.session.execute(
            sa.update(Conversation)
            .where(Conversation.id.in_(starting), Conversation.status == ConversationStatus.STARTING)
            .values(next_attempt_at=now + REENQUEUE_AFTER).execution_options(synchronize_session=False))
    for row in pending:
        defer_send(row.id, row.kind)
    for message_id in inbound:
        defer_inbound(message_id)
    for conversation_id in starting:
        defer_conversation_start(conversation_id)
    db.session.commit()
    counts = {"outbound": len(pending), "inbound": len(inbound), "conversations": len(starting)}
    if any(counts.values()):
        log.info("outbox sweep: %s", counts)
    return counts
