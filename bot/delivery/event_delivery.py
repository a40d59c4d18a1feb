"""Delivering events to EVENTS_WEBHOOK_URL: signed, at least once, in per-contact order.

Each delivery is signed per the Standard Webhooks specification with the `standardwebhooks`
library (headers `webhook-id` = the event's id on every attempt, `webhook-timestamp`,
`webhook-signature` = `v1,<base64 HMAC-SHA256 of id.timestamp.body>`), so receivers verify with
that library or svix in any language. Any 2xx is delivered; anything else, a timeout or a refused
connection is retried on `SCHEDULE` (about a day), then the event is `failed` and waits for a
replay (POST /events/<id>/retry).

Order: events go in the order GET /events serves them, (`txid`, `seq`), and only once every
transaction older than theirs has ended (`bot.models.finished_txid_horizon`), so an event can
never be overtaken by one written before it and committed after. An event is claimed only when
no older event of its contact is still pending or being delivered (as sends, invariant 9).

A waiting event waits in the database and costs nothing (docs/ARCHITECTURE.md, invariant 12):
a task whose event is not due, not yet final or blocked behind an older one simply ends. Whoever
holds one of this process's EVENTS_CONCURRENCY delivery slots goes on with every event that is
due (its own first) until none is left, an attempt fails or `DRAIN_BUDGET` runs out; a task that
finds the slots taken, or the receiver held back after a failure, ends at once, its event left
to the slot holders, to the failed event's scheduled retry, or to the once-a-minute `sweep`,
which enqueues at most EVENTS_CONCURRENCY tasks whatever the backlog. So a dead receiver costs
about one task per attempt actually made, and never holds more than EVENTS_CONCURRENCY threads.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from flask import current_app

from bot.clock import utcnow
from bot.delivery import outbox
from bot.extensions import db
from bot.models import Event, finished_txid_horizon, new_id
from bot.vocabulary import EventStatus

log = logging.getLogger(__name__)

#: Waits after each failed attempt: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (about 27.6 hours
#: in all), then the event is failed. Eight attempts.
SCHEDULE = (timedelta(seconds=5), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2),
            timedelta(hours=5), timedelta(hours=10), timedelta(hours=10))
#: A claim's lease: far longer than one POST (EVENTS_TIMEOUT), so a slow one is never taken over.
LEASE = timedelta(minutes=2)
#: After a failed attempt, this process's other deliveries wait this long before trying.
HOLD_BACK = timedelta(seconds=5)
#: A pending event whose task should have run this long ago is re-enqueued by the sweep.
STALE_AFTER = timedelta(seconds=60)
#: How long one task goes on with the events that are due before handing on to a fresh task
#: (so one task never keeps a worker thread for long, however deep the backlog).
DRAIN_BUDGET = timedelta(seconds=20)
#: How long a task waits for the transactions older than its just-committed event to end
#: (usually milliseconds); past it, the event is left to the sweep.
FINAL_WAIT = timedelta(seconds=2)
#: Events deleted per statement by `prune`, and how long one run may go on.
PRUNE_BATCH = 5000
PRUNE_BUDGET = timedelta(seconds=50)

_slots: threading.BoundedSemaphore | None = None
_slots_lock = threading.Lock()
_receiver_down_until = 0.0  # time.monotonic(); per process: only an optimisation, never a promise


class Outcome:
    """What one run of the delivery task did with its own event (for logs and tests)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    NOT_CLAIMED = "not_claimed"  # not due, not final, blocked, or taken: it waits in the database
    BUSY = "busy"  # this process's delivery slots were taken (or the receiver is held back)


class InFlight(Exception):
    """The event is being delivered right now (a live claim); it cannot be replayed yet."""


@dataclass(frozen=True)
class Claim:
    """One delivery attempt's hold on one event: it may settle the event only while it holds it."""

    seq: int
    token: str
    attempts: int


def _delivery_slots() -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(int(current_app.config["EVENTS_CONCURRENCY"]))
        return _slots


def signed_request(event: Event, secret: str, now: datetime | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery attempt (a fresh timestamp, the same id each time)."""
    # Imported where events are delivered (the worker): the web reads events (GET /events) and
    # never posts them, and requests costs each web process megabytes (bench/THROUGHPUT.md).
    from standardwebhooks.webhooks import Webhook

    body = json.dumps(event.body(), separators=(",", ":"), ensure_ascii=False).encode()
    timestamp = now or utcnow()
    signature = Webhook(secret).sign(msg_id=event.id, timestamp=timestamp, data=body)
    headers = {
        "webhook-id": event.id,
        # Our datetimes are naive UTC (bot.clock), as the library reads naive ones too.
        "webhook-timestamp": str(int(timestamp.replace(tzinfo=timezone.utc).timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": "whatsapp-bot-server-events/1",
    }
    return body, headers


def in_order(event: Any = Event) -> tuple[sa.ColumnElement, ...]:
    """The order of events everywhere (GET /events, per-contact delivery, the sweep): the writing
    transaction's id, then the insert order (bot.models.Event)."""
    return (event.txid, event.seq)


def is_final() -> sa.ColumnElement[bool]:
    """The event's transaction and every older one have ended: nothing can come before it any more."""
    return Event.txid < finished_txid_horizon()


def _older_unfinished() -> sa.Exists:
    older = sa.orm.aliased(Event)
    return sa.exists().where(older.contact_id == Event.contact_id,
                             sa.tuple_(*in_order(older)) < sa.tuple_(*in_order()),
                             older.status.in_((EventStatus.PENDING, EventStatus.DELIVERING)))


def _claimable(now: datetime) -> sa.ColumnElement[bool]:
    """Pending and due, or delivering with an expired lease; final; the first unfinished of its contact."""
    return sa.and_(
        sa.or_(sa.and_(Event.status == EventStatus.PENDING, Event.next_attempt_at <= now),
               sa.and_(Event.status == EventStatus.DELIVERING, Event.claimed_until < now)),
        is_final(),
        sa.or_(Event.contact_id.is_(None), ~_older_unfinished()))


def claim(event_id: str) -> Claim | None:
    """Take an event for one delivery attempt if it is claimable (`_claimable`). One conditional
    UPDATE, which also marks the claim with a fresh token."""
    now = utcnow()
    token = new_id()
    row = db.session.execute(
        sa.update(Event)
        .where(Event.id == event_id, _claimable(now))
        .values(status=EventStatus.DELIVERING, claimed_until=now + LEASE, attempts=Event.attempts + 1,
                claim_token=token)
        .returning(Event.seq, Event.attempts)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    db.session.commit()
    return Claim(seq=row.seq, token=token, attempts=row.attempts) if row is not None else None


def _claim_own(event_id: str) -> Claim | None:
    """Claim the task's own event; if it is due and its turn but an older transaction is still
    running (it committed a moment ago), wait up to FINAL_WAIT for that transaction to end."""
    deadline = time.monotonic() + FINAL_WAIT.total_seconds()
    while True:
        taken = claim(event_id)
        if taken is not None or time.monotonic() >= deadline or not _waits_only_for_older_transactions(event_id):
            return taken
        time.sleep(0.02)


def _waits_only_for_older_transactions(event_id: str) -> bool:
    now = utcnow()
    waiting = db.session.scalar(sa.select(sa.func.count()).select_from(Event).where(
        Event.id == event_id, Event.status == EventStatus.PENDING, Event.next_attempt_at <= now, ~is_final()))
    db.session.commit()
    return bool(waiting)


def _claim_next() -> Claim | None:
    """Claim the oldest claimable event, if any (another worker may take a candidate first)."""
    for _ in range(3):
        candidates = db.session.scalars(
            sa.select(Event.id).where(_claimable(utcnow())).order_by(*in_order()).limit(5)).all()
        db.session.commit()
        if not candidates:
            return None
        for event_id in candidates:
            taken = claim(event_id)
            if taken is not None:
                return taken
    return None


def _held_back() -> bool:
    return time.monotonic() < _receiver_down_until


#: Set by a task that found every slot taken and ended: the next slot holder to finish looks for
#: what it left behind (per process, as the slots are).
_left_to_holders = threading.Event()


def deliver(event_id: str) -> str:
    """Deliver this event if it is its turn, then whatever else is due (see the module's doc).

    Returns what became of this task's own event."""
    if _held_back():
        return Outcome.BUSY  # it waits in the database: its retry, a slot holder or the sweep takes it
    slots = _delivery_slots()
    if not slots.acquire(blocking=False):
        _left_to_holders.set()
        # Try once more after raising the flag: a holder that gave its slot back before seeing
        # the flag has left the slot to us.
        if not slots.acquire(blocking=False):
            return Outcome.BUSY  # a slot holder takes this event once done with its own
    try:
        own = _claim_own(event_id)
        outcome = _attempt(own) if own is not None else Outcome.NOT_CLAIMED
        after = _Drain.FAILING if outcome == Outcome.RETRY else _drain(time.monotonic() + DRAIN_BUDGET.total_seconds())
    finally:
        slots.release()
    # The slot is given back first, then the flag read: a task that ended with the slots taken
    # raised it before trying the slot it then found taken, so its event is seen here.
    left_behind = _left_to_holders.is_set()
    if after != _Drain.FAILING and (after == _Drain.OUT_OF_TIME or left_behind) and not _held_back():
        _left_to_holders.clear()
        following = _first_claimable()
        if following is not None:
            outbox.enqueue(outbox.Work.EVENT, following)  # one fresh task goes on with what is due
    return outcome


class _Drain:
    """How a run of `_drain` ended."""

    IDLE = "idle"  # nothing claimable is left
    FAILING = "failing"  # an attempt failed: the receiver is failing, the others wait for their time
    OUT_OF_TIME = "out_of_time"  # DRAIN_BUDGET spent, maybe with more due


def _drain(deadline: float) -> str:
    """Deliver claimable events one after another, oldest first (`in_order`)."""
    while time.monotonic() < deadline:
        taken = _claim_next()
        if taken is None:
            return _Drain.IDLE
        if _attempt(taken) == Outcome.RETRY:
            return _Drain.FAILING
    return _Drain.OUT_OF_TIME


def _first_claimable() -> str | None:
    found = db.session.scalar(sa.select(Event.id).where(_claimable(utcnow())).order_by(*in_order()).limit(1))
    db.session.commit()
    return found


def _attempt(taken: Claim) -> str:
    """POST one claimed event; settle it (delivered, retry later, failed) if the claim is still ours."""
    global _receiver_down_until
    event = db.session.get(Event, taken.seq)
    cfg = current_app.config
    url, secret = cfg.get("EVENTS_WEBHOOK_URL"), cfg.get("EVENTS_WEBHOOK_SECRET")
    if not url or not secret:  # the URL was removed since the event was written
        return _settle(taken, EventStatus.STORED, None)
    body, headers = signed_request(event, secret)
    db.session.close()  # no connection held while the receiver answers
    error = _post(url, body, headers, float(cfg["EVENTS_TIMEOUT"]))
    if error is None:
        return _settle(taken, EventStatus.DELIVERED, None)
    _receiver_down_until = time.monotonic() + HOLD_BACK.total_seconds()
    return _failed(taken, error)


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> str | None:
    """POST the event; None if the receiver answered 2xx, else why not (for `last_error`)."""
    import requests

    try:
        response = requests.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        return type(exc).__name__
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


def _update_claimed(taken: Claim, **values: object) -> bool:
    """Apply `values` to the event only if this attempt's claim still holds it (a replay or an
    expired lease taken over since leaves it alone: invariant 12, one attempt settles one claim)."""
    updated = db.session.execute(
        sa.update(Event)
        .where(Event.seq == taken.seq, Event.status == EventStatus.DELIVERING, Event.claim_token == taken.token)
        .values(claimed_until=None, claim_token=None, **values)
        .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    if not updated:
        log.info("event #%d: the claim of this attempt was released meanwhile (a replay, or its lease ran "
                 "out); its outcome is not recorded", taken.seq)
    return bool(updated)


def _settle(taken: Claim, status: EventStatus, error: str | None) -> str:
    values: dict[str, object] = {"status": status, "next_attempt_at": None, "last_error": error}
    if status == EventStatus.DELIVERED:
        values["delivered_at"] = utcnow()
    _update_claimed(taken, **values)
    return Outcome.DELIVERED if status == EventStatus.DELIVERED else Outcome.FAILED


def _failed(taken: Claim, error: str) -> str:
    if taken.attempts > len(SCHEDULE):
        log.warning("event #%d failed after %d attempts: %s; replay it with POST /events/<id>/retry",
                    taken.seq, taken.attempts, error)
        _settle(taken, EventStatus.FAILED, error)
        return Outcome.FAILED
    wait = SCHEDULE[taken.attempts - 1]
    if _update_claimed(taken, status=EventStatus.PENDING, next_attempt_at=utcnow() + wait, last_error=error):
        event_id = db.session.scalar(sa.select(Event.id).where(Event.seq == taken.seq))
        db.session.commit()
        outbox.enqueue(outbox.Work.EVENT, event_id, delay=wait)  # one task per attempt made
        log.info("event #%d: attempt %d failed (%s); next in %s", taken.seq, taken.attempts, error, wait)
    return Outcome.RETRY


def retry(event: Event) -> None:
    """Deliver an event again (failed, stored or delivered): pending now, attempts reset.

    Raises InFlight when an attempt holds the event right now (its lease has not run out): the
    replay would race the attempt on the wire. Does not commit; the delivery is enqueued on commit.
    """
    now = utcnow()
    replayed = db.session.execute(
        sa.update(Event)
        .where(Event.seq == event.seq,
               sa.not_(sa.and_(Event.status == EventStatus.DELIVERING, Event.claimed_until >= now)))
        .values(status=EventStatus.PENDING, attempts=0, next_attempt_at=now, claimed_until=None,
                claim_token=None, last_error=None)
        .execution_options(synchronize_session=False)).rowcount
    if not replayed:
        raise InFlight(event.id)
    db.session.expire(event)
    outbox.defer(outbox.Work.EVENT, event.id)


def sweep(now: datetime | None = None) -> int:
    """Enqueue deliveries that should be running and are not: due for a minute (their task lost,
    or ended with the slots taken) or delivering with an expired lease, final and first of their
    contact. At most EVENTS_CONCURRENCY tasks, whatever the backlog: each goes on with everything
    due. A pending event it enqueues is left alone for a while after (claimed_until notes the
    enqueue on a pending row, as the outbox sweep does for retrying messages)."""
    now = now or utcnow()
    stale = now - STALE_AFTER
    rows = db.session.execute(
        sa.select(Event.id).where(
            sa.or_(
                sa.and_(Event.status == EventStatus.PENDING, Event.next_attempt_at <= stale,
                        sa.or_(Event.claimed_until.is_(None), Event.claimed_until < now)),
                sa.and_(Event.status == EventStatus.DELIVERING, Event.claimed_until < now)),
            is_final(), sa.or_(Event.contact_id.is_(None), ~_older_unfinished()),
        ).order_by(*in_order()).limit(int(current_app.config["EVENTS_CONCURRENCY"]))).scalars().all()
    if rows:
        db.session.execute(sa.update(Event).where(Event.id.in_(rows), Event.status == EventStatus.PENDING)
                           .values(claimed_until=now + outbox.REENQUEUE_AFTER)
                           .execution_options(synchronize_session=False))
    for event_id in rows:
        outbox.defer(outbox.Work.EVENT, event_id)
    db.session.commit()
    return len(rows)


def prune(now: datetime | None = None, batch: int | None = None, budget: timedelta | None = None) -> int:
    """Delete delivered and stored events older than EVENTS_RETENTION_DAYS, `batch` rows per
    statement, until none is left or `budget` is spent; failed ones stay (for a replay)."""
    now = now or utcnow()
    batch = batch or PRUNE_BATCH
    deadline = time.monotonic() + (PRUNE_BUDGET if budget is None else budget).total_seconds()
    cutoff = now - timedelta(days=int(current_app.config["EVENTS_RETENTION_DAYS"]))
    total = 0
    while True:
        old = sa.select(Event.seq).where(Event.status.in_((EventStatus.DELIVERED, EventStatus.STORED)),
                                         Event.created_at < cutoff).limit(batch)
        deleted = db.session.execute(sa.delete(Event).where(Event.seq.in_(old.scalar_subquery()))
                                     .execution_options(synchronize_session=False)).rowcount
        db.session.commit()  # one short transaction per batch: no long lock on the table
        total += deleted
        if deleted < batch:
            return total
        if time.monotonic() >= deadline:
            log.info("prune_events: %d deleted, more left for the next run (time budget spent)", total)
            return total
