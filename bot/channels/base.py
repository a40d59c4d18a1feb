"""The one small interface between the sender and a channel (RapidPro courier's handler shape).

The sender (bot.delivery.sender) claims messages, batches them, rate-limits, renews the lease,
records outcomes, retries, holds and fails, and hands a contact's turn to their next message. It
knows no provider: for everything a provider decides it asks the message's channel, through the
methods below (docs/ARCHITECTURE.md, "The channel seam"). Each channel is a sibling package
(`bot.channels.whatsapp`, `bot.channels.email`) whose `channel.py` implements this protocol; the
tasks module (the composition root) registers one instance of each with the sender.

Two kinds of method, by the thread they run on:

- in the task's thread, inside the app context, with the database: `prepare`, `open_sender`,
  `open_lookup`, `match`, `rate_key`, `rate_per_second`;
- on the worker's pool, with neither (they only wait on HTTP): the callables `open_sender` and
  `open_lookup` return. They must not raise for an answer from the provider: every answer maps
  onto an outcome of `bot.channels.outcomes` (an exception the sender does not recognise is
  taken as "may have been accepted").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Protocol

from bot.channels.outcomes import Accepted, Outcome
from bot.vocabulary import MessageStatus


@dataclass(frozen=True)
class Refusal:
    """This message must not reach the provider (opt-out, the window, no address, content that
    can never be sent): it fails at once with this code and text, and the provider is not called."""

    code: int | None
    text: str


@dataclass(frozen=True)
class Wait:
    """A lookup's answer: the provider cannot tell yet whether an earlier attempt was accepted;
    neither record nor send it before `until` (email: SendGrid's events get a grace period)."""

    until: datetime


@dataclass(frozen=True)
class StatusCallback:
    """One status report about one of our sends, parsed by its channel (the provider's field
    names stay at the edge; bot.delivery.statuses stores and applies it).

    `provider_id`: the provider's id of the message (Twilio's SID). `status`: its status name as
    the provider sent it (lowercased), kept in the event even when unknown. `mapped`: that name in
    our vocabulary, or None (kept, not applied). `payload`: every field, kept.
    """

    provider_id: str
    status: str
    mapped: MessageStatus | None
    error_code: int | None = None
    error_message: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)


#: What a lookup matched for a send whose answer was lost: the provider's message (accepted),
#: wait, or None (the provider does not have it: send again).
LookupAnswer = Accepted | Wait | None


class Channel(Protocol):
    """A way out for a message: its provider's facts, behind what the sender needs to know."""

    #: The value of `messages.channel` this channel sends (`bot.vocabulary.Channel`).
    name: str
    #: The `messages` column that keeps the provider's id of an accepted send.
    provider_id_column: str
    #: The provider's status callbacks name its own id (Twilio's SID), so one can arrive before
    #: the send recorded it: the sender applies such early callbacks once it has.
    callbacks_by_provider_id: bool
    #: A send whose answer was lost is looked up in the same batch (the provider answers at once);
    #: otherwise it is left `retrying`, unsure, and looked up before its next attempt.
    looks_up_at_once: bool

    def rate_key(self) -> str:
        """The key of this channel's send-rate budget (one per sender identity)."""

    def rate_per_second(self) -> int:
        """Sends per second this channel's sender may make (its provider's limit, configured)."""

    def prepare(self, message: Any, contact: Any, stop_waiting: bool) -> Any | Refusal:
        """The provider request for a claimed message (a row of `messages`) to `contact`, or why
        it must not be sent. `stop_waiting`: the contact sent a STOP the engine has not handled."""

    def open_sender(self) -> Callable[[Any, datetime], Outcome]:
        """A function `send(request, started) -> Accepted | Failed | Unknown` for this batch,
        safe to call on the pool's threads."""

    def open_lookup(self) -> Callable[[Any], Any]:
        """A function `fetch(request)` for this batch, safe on the pool's threads: what the
        provider has of sends like `request` (for `match`); may raise when it cannot answer."""

    def match(self, message: Any, request: Any, fetched: Any, since: datetime,
              exclude: set[str]) -> LookupAnswer:
        """Which of the `fetched` sends is this attempt's (begun at `since`), none of them having
        an id in `exclude` (taken by another row of the batch); in the task's thread."""
