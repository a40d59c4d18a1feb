"""Webhooks the database could not take: handed to the queue, stored by the worker later.

Twilio does not retry a webhook that answered 5xx (unless its URL asks it to), so an inbound
message the web could not store while the database was down would be lost. Instead a verified
webhook whose storage fails for want of a database is put on the queue as its form fields, and
acknowledged; the worker's `store_webhook` task stores it once the database is back
(docs/ARCHITECTURE.md, invariant 11). Storing stays exactly once per MessageSid (inbound: the
SID's unique index) and per SID and status (status callbacks: the event's unique index), so a
webhook the database took after all, or that Twilio repeats, is stored once.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from bot.channels.whatsapp.callbacks import parse_status_callback
from bot.delivery.outbox import Priority
from bot.delivery.statuses import apply_pending_events, record_callback
from bot.extensions import db
from bot.phone import InvalidNumber

log = logging.getLogger(__name__)

#: SQLite's words for a database it cannot use right now (another writer, a file it cannot
#: open); its other OperationalErrors ("no such table") are bugs, not outages.
SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file", "disk i/o error",
                      "database table is locked")
#: The worker keeps trying to store a queued webhook this long, then gives up (logged).
GIVE_UP_AFTER_SECONDS = 3 * 24 * 3600
#: Retries wait half the time the webhook has waited so far, between these bounds: quick after a
#: blip, once a minute through a long outage.
MIN_RETRY_SECONDS, MAX_RETRY_SECONDS = 2.0, 60.0

_store_task: Callable[..., Any] | None = None


def register(task: Callable[..., Any]) -> None:
    """Tell the fallback which task stores a queued webhook (bot.delivery.tasks registers it)."""
    global _store_task
    _store_task = task


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached (or is busy), rather than a bug.

    Connection errors (refused, reset, server shut down), a pool with no connection to hand out,
    and SQLite's "database is locked" are outages; an integrity or programming error is not.
    """
    if isinstance(exc, sa.exc.TimeoutError):  # the pool waited for a connection in vain
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return False
    if type(exc.orig).__module__.startswith("sqlite3"):
        return any(words in str(exc.orig).lower() for words in SQLITE_UNAVAILABLE)
    return True


def forget_failed_session() -> None:
    """Drop the request's session after a database failure, so the next request starts clean
    (the pool's pre-ping replaces dead connections)."""
    try:
        db.session.rollback()
    except Exception:  # the connection is gone; there is nothing to roll back
        pass
    db.session.remove()


def hand_to_queue(form: Mapping[str, str]) -> bool:
    """Put a verified webhook's form on the queue for the worker to store; False if the queue
    is down too (then only Twilio's own retry can save it)."""
    if _store_task is None:
        raise RuntimeError("no store_webhook task registered (bot.delivery.tasks is not imported)")
    try:
        _store_task(dict(form), time.time(), priority=int(Priority.CONVERSATION))
        return True
    except Exception:
        log.exception("could not queue webhook %s either", form.get("MessageSid"))
        return False


def retry_delay(received_at: float, now: float | None = None) -> float | None:
    """Seconds before the next attempt to store a webhook received at `received_at` (epoch
    seconds); None once it is past giving up."""
    waited = (time.time() if now is None else now) - received_at
    if waited > GIVE_UP_AFTER_SECONDS:
        return None
    return min(MAX_RETRY_SECONDS, max(MIN_RETRY_SECONDS, waited / 2))


def store(form: Mapping[str, str], received_at: float | None,
          store_inbound: Callable[..., Any]) -> str:
    """Store a queued webhook as the web would have, as of `received_at` (epoch seconds, when the
    web received it); idempotent. Returns what happened: "stored", "repeat" (it was stored
    already), or "refused" (bad input, logged).

    `store_inbound`: the conversations package's `store_inbound`, passed by the task (the tasks
    module is the composition root: delivery imports nothing of conversations).

    Raises the database's error when it is still unreachable (the task retries).
    """
    sid = form["MessageSid"]
    if form.get("MessageStatus"):
        if record_callback(parse_status_callback(form)):
            return "stored"
        # Kept already: maybe by the web, whose second statement (applying it) then failed.
        # Applying every event of the SID again is harmless: the rank only moves up.
        apply_pending_events(sid)
        return "repeat"
    try:
        arrived = None if received_at is None else datetime.fromtimestamp(received_at, timezone.utc).replace(tzinfo=None)
        message = store_inbound(form, received_at=arrived)
    except InvalidNumber:
        log.warning("queued inbound %s has an unusable From; dropped", sid)
        return "refused"
    return "stored" if message is not None else "repeat"
