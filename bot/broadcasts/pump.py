"""The pump: one chain of tasks per live broadcast that expands its audience and releases its
messages a window at a time.

A turn is a task that steps for a few seconds (TURN_SECONDS); each step locks the broadcast's
row, then: a scheduled one waits for `send_at`; an expanding one resolves one batch of its
audience (bot/broadcasts/audience.py); any one released tops its unsent messages up to the
window (`window`: half a second of its share of the rate, at most half the worker's calls in
flight) and, once everything left or failed, completes with `broadcast.completed`. The next turn
is scheduled by the turn itself. The outbox therefore never holds more than a window of a
broadcast, so claims stay as cheap as without one and a cancel has little in flight to wait for
(docs/delivery.md, "Broadcasts"; invariant 16).

Only the chain carrying the broadcast's `pump_token` works. A chain lost with the queue (a Redis
flush, a killed worker) leaves `pumped_at` old: `sweep` starts a new chain, which takes a new
token, and any old one still running ends at its next turn.
"""
from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timedelta
from typing import Any, Callable

import sqlalchemy as sa
from flask import current_app

from bot.broadcasts import audience
from bot.broadcasts.counts import counts
from bot.broadcasts.variables import resolve_variables
from bot.clock import utcnow
from bot.delivery import events, outbox
from bot.delivery.claims import UNSENT
from bot.delivery.holding import parse_quiet_hours, release_at, zone
from bot.delivery.shutdown import is_stopping
from bot.extensions import db
from bot.models import Broadcast, BroadcastRecipient, BroadcastTarget, Contact, Message, new_id
from bot.vocabulary import LIVE_BROADCAST, BroadcastState, Channel, Direction, EventType, Kind, MessageStatus

log = logging.getLogger(__name__)

#: How long one turn (one task) keeps stepping before it hands over to the next turn: a turn
#: holds one worker thread, given back this often (a stopping worker ends its turn at once).
TURN_SECONDS = 5.0
#: Between two steps of a sending broadcast: its window is topped up this often.
STEP_SECONDS = 0.1
#: The window: this many seconds of the broadcast's share of the rate may wait in the outbox...
WINDOW_SECONDS = 0.5
#: ... and at least this many (a slow sender still gets a batch's worth at a time).
MIN_WINDOW = 8
#: A released message still pending (no batch took it along) this long after is enqueued again.
STRAGGLER_AFTER = timedelta(seconds=3)
#: A broadcast whose only unsent messages are held for quiet hours looks again this often.
IDLE_SECONDS = 10.0
#: A scheduled broadcast's chain looks at its time at least this often.
SCHEDULED_TURN_SECONDS = 30.0
#: A chain that has not turned for this long is lost: the sweep starts a new one.
LOST_AFTER = timedelta(seconds=90)
#: A live chain marks the broadcast's row (`pumped_at`) this often, not at every step: the mark
#: only has to stay well inside LOST_AFTER, and writing it ten times a second was a statement and
#: a row version each step (the steps make most of a broadcast's statements: bench/THROUGHPUT.md,
#: "Broadcasts", eleventh run).
HEARTBEAT = timedelta(seconds=5)
#: Stragglers (`_kick_stragglers`) are looked for this often, not at every step: a message is
#: one only STRAGGLER_AFTER after its release.
STRAGGLER_CHECK_SECONDS = 1.0

#: How a turn schedules the next: set by bot.delivery.tasks, (broadcast id, token, delay seconds,
#: ahead of the broadcast's sends or behind them).
_schedule: Callable[[str, str, float, bool], Any] | None = None


def register(schedule: Callable[[str, str, float, bool], Any]) -> None:
    """Tell the pump how to schedule its next turn (the tasks module, the composition root)."""
    global _schedule
    _schedule = schedule


def window() -> int:
    """Messages of one broadcast that may wait unsent at once: WINDOW_SECONDS of its share of
    the fastest sender's rate, at least MIN_WINDOW, and at most half the worker's calls in flight
    (SEND_CONCURRENCY): a broadcast's sends waiting for their rate slots never fill the pool the
    replies' calls go through, and a cancel has little in flight to wait for."""
    from bot.delivery.rate_limit import bulk_share_rate  # the worker's: the web imports this module for cancel

    cfg = current_app.config
    rate = max(int(cfg["TWILIO_MESSAGES_PER_SECOND"]), int(cfg.get("EMAIL_MESSAGES_PER_SECOND") or 0))
    share = bulk_share_rate(rate, float(cfg["BROADCAST_RATE_SHARE"]))
    return max(MIN_WINDOW, min(math.ceil(share * WINDOW_SECONDS), int(cfg["SEND_CONCURRENCY"]) // 2))


def _locked(broadcast_id: str) -> Broadcast | None:
    # A row lock on PostgreSQL (a cancel waits for the turn, and the other way round); SQLite's
    # one writer at a time gives the same.
    return db.session.scalar(sa.select(Broadcast).where(Broadcast.id == broadcast_id).with_for_update()
                             .execution_options(populate_existing=True))


def pump(broadcast_id: str, token: str | None = None) -> str:
    """One turn of the broadcast's chain: steps for up to TURN_SECONDS (a sending broadcast's
    window topped up every STEP_SECONDS), then the next turn is scheduled while there is work.
    Returns what it did last (for logs and tests)."""
    deadline = time.monotonic() + TURN_SECONDS
    next_check = 0.0  # stragglers: looked for at a turn's first step, then every STRAGGLER_CHECK_SECONDS
    while True:
        check = time.monotonic() >= next_check
        did, token, delay = _step(broadcast_id, token, stragglers=check)
        if check:
            next_check = time.monotonic() + STRAGGLER_CHECK_SECONDS
        if token is None:
            return did
        if time.monotonic() + delay >= deadline or is_stopping():
            # At once, not after `delay`: a scheduled task waits for the queue's scheduler (about
            # a second), a gap in the broadcast's pace every turn. A sending broadcast's next turn
            # queues behind the sends it released; an expanding one's goes ahead of them.
            _next(broadcast_id, token, 0.0 if delay < 1 else delay, ahead=did == "expanding")
            return did
        time.sleep(delay)


def _step(broadcast_id: str, token: str | None, stragglers: bool = True) -> tuple[str, str | None, float]:
    """One locked step: expand a batch, top the window up (and with `stragglers`, enqueue again
    what no batch took along), or complete. Returns what it did, the chain's token (None: the
    chain ends here) and how long until the next step."""
    broadcast = _locked(broadcast_id)
    now = utcnow()
    if broadcast is None or broadcast.state not in LIVE_BROADCAST:
        db.session.rollback()
        return "ended", None, 0.0
    alive = broadcast.pumped_at is not None and now - broadcast.pumped_at < LOST_AFTER
    ours = token is not None and token == broadcast.pump_token
    if not ours and broadcast.pump_token is not None and alive:
        db.session.rollback()
        return "another chain", None, 0.0
    if not ours or not alive or now - broadcast.pumped_at >= HEARTBEAT:
        token = token if ours else new_id()
        broadcast.pump_token, broadcast.pumped_at = token, now
    if broadcast.state == BroadcastState.SCHEDULED:
        if broadcast.send_at is not None and broadcast.send_at > now:
            db.session.commit()
            _next(broadcast_id, token, min((broadcast.send_at - now).total_seconds(), SCHEDULED_TURN_SECONDS))
            return "scheduled", None, 0.0
        broadcast.state = BroadcastState.EXPANDING
    did, delay = str(BroadcastState.SENDING), STEP_SECONDS
    if broadcast.state == BroadcastState.EXPANDING:
        did, delay = "expanding", 0.0
        if audience.expand_batch(broadcast):
            broadcast.state = BroadcastState.SENDING
            # The listed audience is resolved: its copy as listed is not needed any more.
            db.session.execute(sa.delete(BroadcastTarget).where(BroadcastTarget.broadcast_id == broadcast.id))
    released = release(broadcast, now)
    if did == BroadcastState.SENDING and stragglers:
        _kick_stragglers(broadcast.id, now)
    if broadcast.state == BroadcastState.SENDING and released == 0 and _finished(broadcast):
        _end(broadcast, BroadcastState.COMPLETED, now)
        db.session.commit()
        log.info("broadcast %s completed", broadcast_id)
        return "completed", None, 0.0
    if released == 0 and broadcast.state == BroadcastState.SENDING and _unsent(broadcast.id, held=False) == 0:
        # Only messages held for quiet hours are left: they leave by themselves when due
        # (bot/delivery/release.py); look again now and then rather than every step.
        did, delay = "waiting for held messages", IDLE_SECONDS
    db.session.commit()
    return did, token, delay


def _next(broadcast_id: str, token: str, delay: float, ahead: bool = True) -> None:
    if _schedule is None:
        raise RuntimeError("no pump scheduler: bot.delivery.tasks registers it")
    try:
        _schedule(broadcast_id, token, delay, ahead)
    except Exception:  # the queue is down: the sweep starts a new chain once it is back
        log.exception("could not schedule broadcast %s's next turn; the sweep will", broadcast_id)


def _unsent(broadcast_id: str, *, held: bool = True) -> int:
    """Its messages not yet accepted by a provider; `held=False`: leaving out those held for
    quiet hours (they wait in the database, not in the window)."""
    where = [Message.broadcast_id == broadcast_id, Message.status.in_(UNSENT)]
    if not held:
        where.append(sa.or_(Message.not_before.is_(None), Message.not_before <= utcnow()))
    return db.session.scalar(sa.select(sa.func.count()).select_from(Message).where(*where)) or 0


def _finished(broadcast: Broadcast) -> bool:
    """Every recipient released, and none of their messages still unsent."""
    left = db.session.scalar(sa.select(sa.func.count()).select_from(BroadcastRecipient).where(
        BroadcastRecipient.broadcast_id == broadcast.id, BroadcastRecipient.position > broadcast.released))
    return not left and _unsent(broadcast.id) == 0


def release(broadcast: Broadcast, now: datetime) -> int:
    """Release the next recipients' messages, up to the window; returns how many. Does not
    commit: each message's send is enqueued once the turn commits (the outbox, invariant 1)."""
    room = window() - _unsent(broadcast.id, held=False)
    if room <= 0:
        return 0
    recipients = db.session.execute(
        sa.select(BroadcastRecipient.position, BroadcastRecipient.contact_id, BroadcastRecipient.channel,
                  BroadcastRecipient.variables, BroadcastRecipient.content_sid, BroadcastRecipient.locale,
                  Contact.timezone)
        .join(Contact, Contact.id == BroadcastRecipient.contact_id)
        .where(BroadcastRecipient.broadcast_id == broadcast.id, BroadcastRecipient.position > broadcast.released)
        .order_by(BroadcastRecipient.position).limit(room)).all()
    if not recipients:
        return 0
    shared = resolve_variables(broadcast.variables or {}, {}) if broadcast.template else None
    quiet = parse_quiet_hours(broadcast.quiet_hours)
    default_zone = str(current_app.config.get("DEFAULT_TIMEZONE") or "UTC")
    rows = [{
        "id": new_id(), "direction": Direction.OUTBOUND.value, "kind": Kind.BROADCAST.value,
        "contact_id": recipient.contact_id, "channel": recipient.channel, "broadcast_id": broadcast.id,
        "subject": broadcast.subject, "body": broadcast.body, "template": broadcast.template,
        "content_sid": recipient.content_sid if recipient.channel == Channel.WHATSAPP else None,
        "locale": recipient.locale,
        # Quiet hours in the recipient's own timezone: held in the database until they end
        # (invariant 15; bot/delivery/release.py lets it go).
        "not_before": release_at(now, None, quiet, zone(recipient.timezone, default_zone)) if quiet else None,
        # Kept on the row: the sender checks them again when it sends (a backlog, a retry).
        "quiet_hours": str(quiet) if quiet else None,
        "variables": recipient.variables or shared or None, "backend_metadata": broadcast.backend_metadata,
        "status": MessageStatus.PENDING.value, "status_rank": MessageStatus.PENDING.rank, "attempts": 0,
        "created_at": now, "updated_at": now,
    } for recipient in recipients]
    db.session.execute(sa.insert(Message), rows)
    ready = [row["id"] for row in rows if row["not_before"] is None]
    for row in rows:
        if row["not_before"] is not None:
            outbox.defer_send(row["id"], Kind.BROADCAST, at=row["not_before"])
    # One send task per batch, not per message: the task claims the others along (a task per
    # message would cost a read each, most of them finding their message sent). Any left behind
    # are kicked by `_kick_stragglers`, and the outbox sweep remains the net (invariant 1).
    for message_id in ready[::_task_batch()]:
        outbox.defer_send(message_id, Kind.BROADCAST)
    broadcast.released = recipients[-1].position
    return len(rows)


def _task_batch() -> int:
    """Messages one broadcast send task claims (bot/delivery/sender.py's batch for a broadcast)."""
    from bot.delivery.sender import BROADCAST_SEND_BATCH  # the worker's: the web imports this module for cancel

    return max(1, min(int(current_app.config["SEND_BATCH"]), BROADCAST_SEND_BATCH))


def _kick_stragglers(broadcast_id: str, now: datetime) -> int:
    """Enqueue again its released messages no batch took along (a few seconds old, never
    enqueued on their own); returns how many were found."""
    stale = list(db.session.scalars(
        sa.select(Message.id).where(Message.broadcast_id == broadcast_id, Message.status == MessageStatus.PENDING,
                                    Message.not_before.is_(None), Message.next_attempt_at.is_(None),
                                    Message.created_at < now - STRAGGLER_AFTER)
        .order_by(Message.created_at).limit(100)))
    if stale:
        db.session.execute(sa.update(Message).where(Message.id.in_(stale), Message.status == MessageStatus.PENDING)
                           .values(next_attempt_at=now + outbox.REENQUEUE_AFTER)
                           .execution_options(synchronize_session=False))
        for message_id in stale[::_task_batch()]:
            outbox.defer_send(message_id, Kind.BROADCAST)
    return len(stale)


def _end(broadcast: Broadcast, state: BroadcastState, now: datetime) -> None:
    """Completed or canceled: the state, and broadcast.completed with the counts, in one commit."""
    broadcast.state = state
    broadcast.ended_at = now
    broadcast.pump_token = None
    db.session.flush()
    events.emit(EventType.BROADCAST_COMPLETED, {
        "broadcast_id": broadcast.id, "state": str(state), **counts(broadcast),
        "metadata": broadcast.backend_metadata}, contact_id=None)


def cancel(broadcast_id: str) -> Broadcast | None:
    """Stop a broadcast: nothing more is released, and its messages not yet claimed are
    canceled (never sent); those on the wire finish and are reported. Commits. None: no such
    broadcast."""
    broadcast = _locked(broadcast_id)
    if broadcast is None:
        db.session.rollback()
        return None
    if broadcast.state not in LIVE_BROADCAST:
        db.session.rollback()
        return broadcast
    now = utcnow()
    # A message whose earlier attempt may have been accepted is left to its lookup: canceling it
    # would hide a message that may have left (invariant 2).
    db.session.execute(
        sa.update(Message)
        .where(Message.broadcast_id == broadcast_id, Message.unsure_since.is_(None),
               Message.status.in_((MessageStatus.PENDING, MessageStatus.RETRYING)))
        .values(status=MessageStatus.CANCELED, status_rank=MessageStatus.CANCELED.rank, updated_at=now,
                claimed_until=None, next_attempt_at=None)
        .execution_options(synchronize_session=False))
    db.session.execute(sa.delete(BroadcastTarget).where(BroadcastTarget.broadcast_id == broadcast_id))
    _end(broadcast, BroadcastState.CANCELED, now)
    db.session.commit()
    log.info("broadcast %s canceled", broadcast_id)
    return broadcast


def sweep(now: datetime | None = None) -> int:
    """Start a new chain for each live broadcast whose chain was lost; returns how many."""
    now = now or utcnow()
    lost = list(db.session.scalars(
        sa.select(Broadcast.id).where(Broadcast.state.in_(LIVE_BROADCAST),
                                      sa.func.coalesce(Broadcast.pumped_at, Broadcast.created_at) < now - LOST_AFTER)
        .limit(100)))
    db.session.commit()
    for broadcast_id in lost:
        outbox.enqueue(outbox.Work.BROADCAST, broadcast_id, outbox.Priority.BROADCAST_PUMP)
    if lost:
        log.info("broadcast sweep: %d chains started again", len(lost))
    return len(lost)
