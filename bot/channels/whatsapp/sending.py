"""One Twilio send: `messages.create`, its answer mapped onto Accepted / Failed / Unknown.

Runs on the worker's pool (no app context, no database). What Twilio's answers mean follows
Twilio's error dictionary and the SDK (docs/ARCHITECTURE.md, "Retries"): an attempt whose fate is
unknown "may have been accepted" (invariant 2) — a connection dropped after the request was
written, a read timeout, a 502/504 from a proxy, a 500 from Twilio (`AMBIGUOUS_HTTP_STATUSES`),
an error from the client we do not recognise — and is looked up before another attempt. Errors
that prove the request never left (a refused connection, a connect timeout) retry without one.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import requests
import urllib3
from twilio.base.exceptions import TwilioException

from bot.channels.outcomes import Accepted, Failed, Outcome, Unknown
from bot.channels.whatsapp.errors import ATTEMPT_LIMITS, is_retryable, is_too_fast, request_never_left
from bot.vocabulary import OUTBOUND_STATUSES, MessageStatus

log = logging.getLogger(__name__)

#: Twilio HTTP answers that say nothing of whether the message was accepted: a proxy between us
#: and Twilio lost the answer (502) or gave up waiting for it (504), or Twilio's own 500. Its
#: error 20500 ("an error in the server handling logic or a timeout in the API") says a
#: non-idempotent POST such as sending a message may have taken effect: retried blindly, "it is
#: possible for a customer to receive multiple messages" (twilio.com/docs/api/errors/20500). So a
#: 500 is looked up before another attempt, as a 502/504 is. A 503 (20503, "temporarily
#: unavailable, try again with back-off") refused the request: it retries without a lookup.
AMBIGUOUS_HTTP_STATUSES = frozenset({500, 502, 504})


def accepted_status(twilio_status: str | None) -> MessageStatus:
    """Twilio's status of a message it took, in our vocabulary: a create() answers its starting
    status (queued, accepted, scheduled); a lookup may find a later one (sent, delivered...)."""
    status = (twilio_status or "").lower()
    return MessageStatus(status) if status in OUTBOUND_STATUSES else MessageStatus.QUEUED


def send(client: Any, params: dict, started: datetime) -> Outcome:
    """`client.messages.create(**params)`, and what its answer means."""
    try:
        created = client.messages.create(**params)
    except Exception as exc:  # every answer is an outcome (bot/channels/base.py)
        return classify(exc, started)
    return Accepted(created.sid, accepted_status(created.status).value)


def classify(exc: Exception, started: datetime) -> Outcome:
    """What an exception from `messages.create` says of the attempt begun at `started`."""
    if isinstance(exc, TwilioException):  # TwilioRestException and (since 9.10) TwilioServiceException
        http_status = getattr(exc, "status", None)
        code = getattr(exc, "code", None)
        text = getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", None) or str(exc)
        if http_status in AMBIGUOUS_HTTP_STATUSES:
            return Unknown(f"HTTP {http_status} from Twilio: {text}", started, http_status, code)
        return Failed(code, text, is_retryable(http_status, code), http_status,
                      too_fast=is_too_fast(http_status, code), max_attempts=ATTEMPT_LIMITS.get(code))
    # urllib3's own errors from our client under the SDK (bot/channels/whatsapp/client.py), or
    # `requests`' wrappings of them: the same causes, read the same way.
    if isinstance(exc, (urllib3.exceptions.HTTPError, requests.RequestException)):
        if request_never_left(exc):
            return Failed(None, f"{type(exc).__name__} connecting to Twilio", retry=True)
        # The request may have reached Twilio and only the answer been lost.
        return Unknown(f"{type(exc).__name__} talking to Twilio", started)
    if isinstance(exc, UnicodeEncodeError):
        # The request could not be encoded (a lone surrogate in a field): it never left, and this
        # content never will leave: the one unexpected error certain to recur, so it fails now.
        log.error("a message's content cannot be encoded for Twilio", exc_info=exc)
        return Failed(None, f"not sent: unexpected {type(exc).__name__} (see the worker's log)", retry=False)
    # Raised by the client itself, which we do not recognise: it may have come after the request
    # was written (an answer it could not read), so the attempt may have been accepted: Twilio is
    # looked up before another. Never `failed` here: nothing unrecognised proves the message can
    # never be sent, and the sender's MAX_ATTEMPTS bounds the retries should it be a bug
    # (docs/ARCHITECTURE.md, "Retries").
    log.error("unexpected error from the Twilio client", exc_info=exc)
    return Unknown(f"unexpected {type(exc).__name__} from the Twilio client (see the worker's log)", started)
