"""What one send returns, whatever the channel: accepted, failed, or unknown.

These are the only words the sender needs to hear from a channel (invariant 2 of the design:
"any attempt whose fate is unknown may have been accepted"). A channel maps its provider's
answers onto them at the edge (for email: `bot.channels.email.sending`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Accepted:
    """The provider took the message.

    `provider_id`: the provider's id for it (Twilio's SID; SendGrid's `X-Message-Id`, which is per
    request and can be missing: then ""). `status`: the status it answered with, in our
    vocabulary (`bot.vocabulary.MessageStatus` values).
    """

    provider_id: str
    status: str


@dataclass(frozen=True)
class Failed:
    """The provider did not take the message, and said so (or the request provably never left).

    `code`: the provider's error code; a provider without numeric codes (SendGrid) gives its HTTP
    status here, so a backend still sees 400 / 401 / 403. `text`: the provider's own message, safe
    to store (it never echoes the recipient's address). `retry`: another attempt may succeed
    (429, 5xx, a refused connection). `hold`: retry slowly and never give up on the message —
    the account, not the message, is at fault (SendGrid's 401: a bad key, or "Maximum credits
    exceeded"); an operator fixes it and the held messages leave. `http_status`: None when no
    answer came (the connection was refused). `too_fast`: the provider asked us to slow down
    (Twilio's 429, 20429, 63018): the sender slows the channel's rate for every worker.
    `max_attempts`: this error is worth fewer attempts in all than the sender's default (Twilio's
    30003: two), or None.
    """

    code: int | None
    text: str
    retry: bool
    http_status: int | None = None
    hold: bool = False
    too_fast: bool = False
    max_attempts: int | None = None


@dataclass(frozen=True)
class Unknown:
    """The attempt may have been accepted: never resend blind.

    A read timeout, a connection dropped after the request was written, a 502/504 from a proxy.
    `since`: when the attempt started (a lookup, where the provider offers one, asks for what
    arrived after it). `http_status`: the answer's status when there was one (502, 504); `code`:
    the provider's error code when it gave one (Twilio's 20500), kept on the row while it waits.
    """

    reason: str
    since: datetime
    http_status: int | None = None
    code: int | None = None


#: What a channel's send returns.
Outcome = Accepted | Failed | Unknown
