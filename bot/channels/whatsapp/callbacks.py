"""Twilio's status callbacks, read at the edge: its field names and status names, ours inside.

A status callback is a form POSTed to TWILIO_WEBHOOK_URL (the same URL as inbound messages):
`MessageSid`, `MessageStatus`, and on a failure `ErrorCode` and `ErrorMessage` (or
`ChannelStatusMessage`). bot.delivery.statuses stores and applies the parsed callback without
knowing those names (docs/ARCHITECTURE.md, "The channel seam").
"""
from __future__ import annotations

from typing import Any, Mapping

from bot.channels.base import StatusCallback
from bot.vocabulary import MessageStatus, parse_outbound_status


def status_of(name: str) -> MessageStatus | None:
    """Twilio's outbound status name in our vocabulary. Ours were named after Twilio's (queued,
    sent, delivered, undelivered, read, ...), so the map is the vocabulary's parser; a name Twilio
    adds without notice is None."""
    return parse_outbound_status(name.strip().lower())


def parse_error_code(value: Any) -> int | None:
    """Twilio sends ErrorCode as a string; an empty or non-numeric one is no code."""
    try:
        code = int(str(value).strip()) if value not in (None, "") else None
    except ValueError:
        return None
    # Twilio codes are five digits; anything outside a database integer stays in the payload only.
    return code if code is not None and 0 < code < 2**31 else None


def parse_status_callback(form: Mapping[str, str]) -> StatusCallback:
    """A status callback's form (it has MessageSid and MessageStatus: the route checked)."""
    status = form["MessageStatus"].strip().lower()
    return StatusCallback(
        provider_id=form["MessageSid"],
        status=status,
        mapped=status_of(status),
        error_code=parse_error_code(form.get("ErrorCode")),
        error_message=form.get("ErrorMessage") or form.get("ChannelStatusMessage") or None,
        payload=dict(form),
    )
