"""Reconciliation: asking Twilio what became of messages whose status callbacks never came.

A status callback can be lost (our database and queue both down, a Twilio incident, a webhook
that answered an error). A message would then stay `sent` (or `queued`...) forever. A periodic
job fetches the status of outbound messages that have sat short of a final status for longer
than RECONCILE_AFTER_MINUTES (`client.messages(sid).fetch()`), and applies what Twilio says
through the very path a callback takes (`statuses.record_callback`): kept as a status event whose
payload says it came from reconciliation, the rank only moving up, the error code kept
(docs/ARCHITECTURE.md, invariant 3). A message is asked about again at most every
RECONCILE_AFTER_MINUTES, up to BATCH messages a run, and no more once it is MAX_AGE old.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app

from bot.channels.whatsapp.callbacks import parse_status_callback
from bot.clock import utcnow
from bot.delivery.statuses import record_callback
from bot.extensions import db
from bot.models import Message
from bot.channels.whatsapp.client import get_client
from bot.vocabulary import Direction, MessageStatus

log = logging.getLogger(__name__)

#: Twilio has the message and more news is expected (a callback may have been lost).
AWAITING_NEWS = (MessageStatus.ACCEPTED, MessageStatus.SCHEDULED, MessageStatus.QUEUED,
                 MessageStatus.SENDING, MessageStatus.SENT)
#: The payload field that marks an event learnt by reconciliation (lower case: Twilio's own
#: fields are CamelCase, so it can never collide with one).
SOURCE_FIELD, SOURCE = "source", "reconciliation"
#: After a failed fetch the message is asked about again this much later (not at the next
#: RECONCILE_AFTER_MINUTES), behind the messages never asked about.
RETRY_AFTER_ERROR = timedelta(minutes=10)
#: Messages asked about per run (a run every 5 minutes: 1,200 an hour, a fraction of what
#: Twilio's API allows, one thread of one worker for ~20 s at Twilio's 200 ms).
BATCH = 100
#: A message this old is no longer asked about: Twilio has long told what it will.
MAX_AGE = timedelta(days=3)
#: This many failed fetches in a row end the run: Twilio (or the way to it) is down.
MAX_ERRORS_IN_A_ROW = 3


def due_messages(now: datetime, after: timedelta, max_age: timedelta, limit: int) -> list[Any]:
    """(id, twilio_sid) of outbound messages to ask Twilio about, never-asked ones first."""
    return db.session.execute(
        sa.select(Message.id, Message.twilio_sid).where(
            Message.direction == Direction.OUTBOUND,
            Message.status.in_(AWAITING_NEWS),  # the outbox index (status, ...) narrows this
            Message.twilio_sid.is_not(None),
            Message.updated_at <= now - after,
            Message.created_at >= now - max_age,
            sa.or_(Message.reconciled_at.is_(None), Message.reconciled_at <= now - after),
        ).order_by(Message.reconciled_at.asc().nulls_first(), Message.created_at).limit(limit)
    ).all()


def reconcile(now: datetime | None = None) -> dict[str, int]:
    """Fetch and apply the status of due messages; never raises for a Twilio error.

    Returns counts, for logs and tests: asked (fetched), learnt (a status event was new),
    errors (failed fetches, asked again in a later run).
    """
    now = now or utcnow()
    after = timedelta(minutes=current_app.config["RECONCILE_AFTER_MINUTES"])
    rows = due_messages(now, after, MAX_AGE, BATCH)
    db.session.commit()  # no transaction held open across the calls to Twilio
    counts = {"asked": 0, "learnt": 0, "errors": 0}
    errors_in_a_row = 0
    for message_id, sid in rows:
        try:
            fetched = get_client().messages(sid).fetch()
        except Exception as exc:  # the SDK's errors, timeouts, refused connections: all the same here
            counts["errors"] += 1
            errors_in_a_row += 1
            log.warning("reconciliation: fetching %s failed (%s: %s); asked again later", sid,
                        type(exc).__name__, getattr(exc, "code", None) or getattr(exc, "status", None))
            _mark(message_id, now - after + RETRY_AFTER_ERROR)
            if errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                log.warning("reconciliation: %d failures in a row; the rest waits for the next run", errors_in_a_row)
                break
            continue
        errors_in_a_row = 0
        counts["asked"] += 1
        if apply_fetched(sid, fetched.status, fetched.error_code, fetched.error_message):
            counts["learnt"] += 1
        _mark(message_id, now)
    if any(counts.values()):
        log.info("reconciliation: %s", counts)
    return counts


def apply_fetched(sid: str, status: str | None, error_code: Any = None, error_message: str | None = None) -> bool:
    """Apply a status fetched from Twilio as a status callback would be; True if it was news
    (no event for this SID and status yet)."""
    if not status:
        return False
    form = {"MessageSid": sid, "MessageStatus": str(status).lower(), SOURCE_FIELD: SOURCE}
    if error_code not in (None, "", 0):
        form["ErrorCode"] = str(error_code)
    if error_message:
        form["ErrorMessage"] = str(error_message)
    return record_callback(parse_status_callback(form))


def _mark(message_id: str, when: datetime) -> None:
    # updated_at keeps its value: it says when the status last moved, which is what "sat in a
    # status for long" measures.
    db.session.execute(sa.update(Message).where(Message.id == message_id)
                       .values(reconciled_at=when, updated_at=Message.updated_at)
                       .execution_options(synchronize_session=False))
    db.session.commit()
