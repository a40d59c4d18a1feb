"""SendGrid's Event Webhook batches → normalized records, mapped onto our statuses. Pure code.

A POST carries a JSON array of events (docs/ARCHITECTURE.md, "Email channel (pieces)"): batched,
repeated (SendGrid retries any non-2xx for 24 hours, and duplicates are routine), in no order.
Every event has `email`, `timestamp`, `event`, `sg_event_id` (the dedup key), `sg_message_id`,
and our custom args copied top-level: `message_id` is how an event finds its message.

The mapping (only ever upward: the caller applies it by rank, as for Twilio's callbacks):

| SendGrid event | ours |
|---|---|
| processed | accepted |
| delivered | delivered |
| bounce, dropped | failed, with SendGrid's reason |
| open | read |
| deferred, click, group_resubscribe, any other | recorded only |
| spamreport, unsubscribe, group_unsubscribe | an email opt-out (WhatsApp consent untouched) |

Odd input never raises: an event that is not an object, or lacks `sg_event_id` or `event`, comes
back with `usable=False` and the reason in `problem`, so one bad event cannot make SendGrid
retry a whole batch for a day.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from bot.channels.email.mail import MESSAGE_ID_ARG
from bot.vocabulary import MessageStatus

#: SendGrid event → the status it moves our message to.
STATUS_BY_EVENT: dict[str, MessageStatus] = {
    "processed": MessageStatus.ACCEPTED,
    "delivered": MessageStatus.DELIVERED,
    "bounce": MessageStatus.FAILED,
    "dropped": MessageStatus.FAILED,
    "open": MessageStatus.READ,
}
#: Events that opt the address out of email (and only email).
OPT_OUT_EVENTS = frozenset({"spamreport", "unsubscribe", "group_unsubscribe"})
#: The longest text kept from one field (a reason or an SMTP response).
MAX_TEXT = 500
_ADDRESS = re.compile(r"[^\s<>\"'(),;:]+@[^\s<>\"'(),;:]+")


class BadBatch(ValueError):
    """The body is not a JSON array (the route answers 400)."""


@dataclass(frozen=True)
class EmailEvent:
    """One SendGrid event, normalized.

    `event`: SendGrid's name, lower-cased ("" when absent). `message_id`: our id from the custom
    arg (None: not one of ours, or sent without it). `status`: what it moves the message to, or
    None (recorded only). `opt_out`: it opts `email` out of email. `reason`: SendGrid's words
    (bounce/dropped `reason`, deferred `response`), any address in them masked. `smtp_status`:
    a bounce's enhanced status code ("5.1.1"); `bounce_type`: "bounce" or "blocked".
    `usable`: False when the event cannot be applied at all (`problem` says why).
    """

    sg_event_id: str | None
    event: str
    message_id: str | None
    sg_message_id: str | None
    email: str | None
    timestamp: datetime | None
    status: MessageStatus | None
    opt_out: bool
    reason: str | None
    smtp_status: str | None
    bounce_type: str | None
    usable: bool
    problem: str | None = None


def parse_batch(body: bytes | str) -> list[EmailEvent]:
    """Every event of one Event Webhook POST, in the order given. BadBatch when the body is not
    a JSON array; odd events inside it come back unusable, never raise."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise BadBatch("the body is not JSON") from exc
    if not isinstance(payload, list):
        raise BadBatch("the body is not a JSON array of events")
    return [parse_event(item) for item in payload]


def parse_event(item: Any) -> EmailEvent:
    """One event object → EmailEvent (never raises)."""
    if not isinstance(item, dict):
        return _unusable(None, "", "not an object")
    event = item.get("event")
    sg_event_id = _text(item.get("sg_event_id"))
    name = (_text(event) or "").lower() if isinstance(event, str) else ""
    if not sg_event_id:
        return _unusable(None, name, "no sg_event_id")
    if not name:
        return _unusable(sg_event_id, "", "no event name")
    email = _text(item.get("email"))
    opt_out = name in OPT_OUT_EVENTS
    if opt_out and not email:
        return _unusable(sg_event_id, name, "an opt-out without an email address")
    reason = _text(item.get("reason")) or (_text(item.get("response")) if name == "deferred" else None)
    return EmailEvent(
        sg_event_id=sg_event_id,
        event=name,
        message_id=_text(item.get(MESSAGE_ID_ARG)),
        sg_message_id=_text(item.get("sg_message_id")),
        email=email,
        timestamp=_timestamp(item.get("timestamp")),
        status=STATUS_BY_EVENT.get(name),
        opt_out=opt_out,
        reason=_masked(reason),
        smtp_status=_text(item.get("status")) if name in ("bounce", "dropped") else None,
        bounce_type=_text(item.get("type")) if name == "bounce" else None,
        usable=True,
    )


def _unusable(sg_event_id: str | None, event: str, problem: str) -> EmailEvent:
    return EmailEvent(sg_event_id=sg_event_id, event=event, message_id=None, sg_message_id=None, email=None,
                      timestamp=None, status=None, opt_out=False, reason=None, smtp_status=None,
                      bounce_type=None, usable=False, problem=problem)


def _text(value: Any) -> str | None:
    """A non-empty string from a string or an integer (custom args are strings, but a sender
    may have sent a number), capped at MAX_TEXT; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    # NULs and lone surrogates are valid JSON but no database text can hold them (PostgreSQL
    # refuses a NUL): dropped here, so an odd event is stored, never a 500.
    value = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8").strip()
    return value[:MAX_TEXT] or None


def _timestamp(value: Any) -> datetime | None:
    """Unix seconds (int, float or digits) → an aware UTC datetime; None when unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    try:
        return datetime.fromtimestamp(value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def _masked(text: str | None) -> str | None:
    # Bounce reasons quote the recipient ("550 5.1.1 <ada@example.com>: user unknown"); what we
    # keep and show must not carry addresses (no emails in logs or error bodies).
    return _ADDRESS.sub("<address>", text) if text else text
