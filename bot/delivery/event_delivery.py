"""Delivering events to EVENTS_WEBHOOK_URL: signed, at least once, in per-contact order.

Each delivery is signed per the Standard Webhooks specification with the `standardwebhooks`
library (headers `webhook-id` = the event's id on every attempt, `webhook-timestamp`,
`webhook-signature` = `v1,<base64 HMAC-SHA256 of id.timestamp.body>`), so receivers verify with
that library or svix in any language. Any 2xx is delivered; anything else, a timeout or a refused
connection is retried on `SCHEDULE` (about a day), then the event is `failed` and waits for a
replay (POST /events/<id>/retry).

Order: an event is claimed only when no older event of its contact is still pending or being
delivered, and a finished delivery hands the turn to the contact's next one (as sends do,
invariant 9). A slow or dead receiver never slows sends or turns: at most EVENTS_CONCURRENCY
deliveries per worker process talk to it at once (a task that finds them busy reschedules itself
without claiming), each waits at most EVENTS_TIMEOUT, and after a failed attempt the others of
this process hold back for a few seconds instead of each waiting out the same dead receiver.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import requests
import sqlalchemy as sa
from flask import current_app
from standardwebhooks.webhooks import Webhook

from bot.clock import utcnow
from bot.delivery import outbox
from bot.extensions import db
from bot.models import Event
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

_slots: threading.BoundedSemaphore | None = None
_slots_lock = threading.Lock()
_receiver_down_until = 0.0  # time.monotonic(); per process: only an optimisation, never a promise


class Outcome:
    """What one run of the delivery task did (for logs and tests)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    NOT_CLAIMED = "not_claimed"
    BUSY = "busy"  # this process's delivery slots were taken (or the receiver is held back)


def _delivery_slots() -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(int(current_app.config["EVENTS_CONCURRENCY"]))
        return _slots


def signed_request(event: Event, secret: str, now: datetime | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery attempt (a fresh timestamp, the same id each time)."""
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


def _older_unfinished() -> sa.Exists:
    older = sa.orm.aliased(Event)
    return sa.exists().where(older.contact_id == Event.contact_id, older.seq < Event.seq,
                             older.status.in_((EventStatus.PENDING, EventStatus.DELIVERING)))


def claim(event_id: str) -> Event | None:
    """Take an event for one delivery attempt: pending and due, or delivering with an expired
    lease, and the oldest unfinished event of its contact. One conditional UPDATE."""
    now = utcnow()
    claimed = db.session.execute(
        sa.update(Event)
        .where(Event.id == event_id,
               sa.or_(sa.and_(Event.status == EventStatus.PENDING, Event.next_attempt_at <= now),
                      sa.and_(Event.status == EventStatus.DELIVERING, Event.claimed_until < now)),
               sa.or_(Event.contact_id.is_(None), ~_older_unfinished()))
        .values(status=EventStatus.DELIVERING, claimed_until=now + LEASE, attempts=Event.attempts + 1)
        .returning(Event.seq)
        .execution_options(synchronize_session=False)
    ).scalar()
    db.session.commit()
    return db.session.get(Event, claimed) if claimed is not None else None


def deliver(event_id: str) -> str:
    """One delivery attempt of one event, if it is its turn; schedules what follows."""
    global _receiver_down_until
    if time.monotonic() < _receiver_down_until:
        outbox.enqueue(outbox.Work.EVENT, event_id, delay=timedelta(seconds=_receiver_down_until - time.monotonic()))
        return Outcome.BUSY
    slots = _delivery_slots()
    if not slots.acquire(blocking=False):
        outbox.enqueue(outbox.Work.EVENT, event_id, delay=timedelta(seconds=1))
        return Outcome.BUSY
    try:
        event = claim(event_id)
        if event is None:
            return Outcome.NOT_CLAIMED
        cfg = current_app.config
        url, secret = cfg.get("EVENTS_WEBHOOK_URL"), cfg.get("EVENTS_WEBHOOK_SECRET")
        if not url or not secret:  # the URL was removed since the event was written
            return _finish(event, EventStatus.STORED, None)
        body, headers = signed_request(event, secret)
        db.session.close()  # no connection held while the receiver answers
        error = _post(url, body, headers, float(cfg["EVENTS_TIMEOUT"]))
    finally:
        slots.release()
    event = db.session.get(Event, event.seq)
    if error is None:
        return _finish(event, EventStatus.DELIVERED, None)
    _receiver_down_until = time.monotonic() + HOLD_BACK.total_seconds()
    return _failed(event, error)


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> str | None:
    """POST the event; None if the receiver answered 2xx, else why not (for `last_error`)."""
    try:
        response = requests.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        return type(exc).__name__
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


def _finish(event: Event, status: EventStatus, error: str | None) -> str:
    now = utcnow()
    event.status = status
    event.claimed_until = None
    event.next_attempt_at = None
    event.last_error = error
    if status == EventStatus.DELIVERED:
        event.delivered_at = now
    db.session.commit()
    _hand_over(event)
    return Outcome.DELIVERED if status == EventStatus.DELIVERED else Outcome.FAILED


def _failed(event: Event, error: str) -> str:
    if event.attempts > len(SCHEDULE):
        log.warning("event %s (%s) failed after %d attempts: %s; replay it with POST /events/%s/retry",
                    event.id, event.type, event.attempts, error, event.id)
        return _finish(event, EventStatus.FAILED, error)
    wait = SCHEDULE[event.attempts - 1]
    event.status = EventStatus.PENDING
    event.claimed_until = None
    event.next_attempt_at = utcnow() + wait
    event.last_error = error
    db.session.commit()
    outbox.enqueue(outbox.Work.EVENT, event.id, delay=wait)
    log.info("event %s: attempt %d failed (%s); next in %s", event.id, event.attempts, error, wait)
    return Outcome.RETRY


def _hand_over(event: Event) -> None:
    """The contact's next unfinished event goes now (its own task found this one in the way)."""
    if event.contact_id is None:
        return
    following = db.session.scalar(
        sa.select(Event.id).where(Event.contact_id == event.contact_id, Event.seq > event.seq,
                                  Event.status == EventStatus.PENDING)
        .order_by(Event.seq).limit(1))
    db.session.commit()
    if following is not None:
        outbox.enqueue(outbox.Work.EVENT, following)


def retry(event: Event) -> None:
    """Deliver a failed (or stored, or delivered) event again: pending now, attempts reset.

    Does not commit; the delivery is enqueued on commit.
    """
    event.status = EventStatus.PENDING
    event.attempts = 0
    event.next_attempt_at = utcnow()
    event.claimed_until = None
    event.last_error = None
    outbox.defer(outbox.Work.EVENT, event.id)


def sweep(now: datetime | None = None, limit: int = 1000) -> int:
    """Re-enqueue events whose task was lost (a dead queue, a killed worker): due for a minute,
    or delivering with an expired lease. Each is left alone for a while after (claimed_until
    notes the enqueue on a pending row, as the outbox sweep does for retrying messages)."""
    now = now or utcnow()
    stale = now - STALE_AFTER
    rows = db.session.execute(
        sa.select(Event.id).where(sa.or_(
            sa.and_(Event.status == EventStatus.PENDING, Event.next_attempt_at <= stale,
                    sa.or_(Event.claimed_until.is_(None), Event.claimed_until < now)),
            sa.and_(Event.status == EventStatus.DELIVERING, Event.claimed_until < now),
        )).order_by(Event.seq).limit(limit)).scalars().all()
    if rows:
        db.session.execute(sa.update(Event).where(Event.id.in_(rows), Event.status == EventStatus.PENDING)
                           .values(claimed_until=now + outbox.REENQUEUE_AFTER)
                           .execution_options(synchronize_session=False))
    for event_id in rows:
        outbox.defer(outbox.Work.EVENT, event_id)
    db.session.commit()
    return len(rows)


def prune(now: datetime | None = None, limit: int = 5000) -> int:
    """Delete delivered and stored events older than EVENTS_RETENTION_DAYS; failed ones stay."""
    now = now or utcnow()
    cutoff = now - timedelta(days=int(current_app.config["EVENTS_RETENTION_DAYS"]))
    old = sa.select(Event.seq).where(Event.status.in_((EventStatus.DELIVERED, EventStatus.STORED)),
                                     Event.created_at < cutoff).limit(limit)
    deleted = db.session.execute(sa.delete(Event).where(Event.seq.in_(old.scalar_subquery()))
                                 .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    return deleted
