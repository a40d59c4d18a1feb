"""Twilio error codes: which failed sends are retried, and the codes we use when we refuse ourselves.

The table follows Twilio's error dictionary (docs/ARCHITECTURE.md, "Retries").
"""
from __future__ import annotations

#: Worth another try later, with backoff: concurrency overflow, rate limits, transient handset
#: and unknown errors (the retry count bounds the last two).
RETRYABLE_CODES = frozenset({20429, 63018, 30003, 30008})

#: Never retried: the content, the recipient or the account must change first.
PERMANENT_CODES = frozenset({
    63016,  # outside the 24-hour window: needs a template or a new message from the user
    21610, 63014,  # opted out / blocked the business
    21211, 63003, 63024,  # invalid or non-WhatsApp recipient
    21408,  # region not enabled
    21617, 63021,  # content too long / invalid
    63015,  # sandbox recipient has not joined
    63032, 63049,  # Meta withheld a marketing template
    30004, 30005, 30006, 30007,  # blocked, unknown destination, landline, filtered
})


def is_retryable(http_status: int | None, code: int | None) -> bool:
    """Whether a failed create() may be tried again: 429s, 5xx and the retryable codes."""
    if code in PERMANENT_CODES:
        return False
    if code in RETRYABLE_CODES:
        return True
    return http_status is not None and (http_status == 429 or http_status >= 500)


#: Twilio saying "slower": REST concurrency overflow, or a sender / portfolio / recipient rate limit.
TOO_FAST_CODES = frozenset({20429, 63018})


def is_too_fast(http_status: int | None, code: int | None) -> bool:
    """Whether Twilio refused because we send too fast (every worker should slow down)."""
    return http_status == 429 or code in TOO_FAST_CODES


#: Retryable codes worth fewer tries than the default (30003: "maybe once, later"; 30008:
#: "limited"): the handset or the cause is unlikely to change within hours.
ATTEMPT_LIMITS = {30003: 2, 30008: 3}


def attempt_limit(code: int | None, default: int) -> int:
    """How many attempts in all a message failing with `code` gets (`default` for most)."""
    return ATTEMPT_LIMITS.get(code, default)


#: Our own refusals reuse Twilio's numbers, so a backend handles one meaning whoever refused.
OPTED_OUT_CODE = 21610
OUTSIDE_WINDOW_CODE = 63016
TOO_LONG_CODE = 21617


def request_never_left(exc: BaseException) -> bool:
    """Whether a failed HTTP call to Twilio provably never reached it: no connection was made
    (refused, unresolvable, the connect timed out). Anything else after the connection opened
    (a read timeout, a dropped connection, a reset) may have been accepted, and must be looked
    up before another attempt (docs/ARCHITECTURE.md, invariant 2).

    The Twilio client raises urllib3's errors as they are (bot/channels/whatsapp/client.py);
    `requests`' wrappings of the same errors are read too (another client under the SDK)."""
    from urllib3.exceptions import ConnectTimeoutError

    # NewConnectionError and NameResolutionError are ConnectTimeoutErrors in urllib3 2.
    if isinstance(exc, ConnectTimeoutError):
        return True
    import requests

    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError names the cause
    return isinstance(reason, ConnectTimeoutError)
