"""Which channel carries a notification: the user's order, skipping what cannot be used.

Pure decisions over a contact's stored facts (no query, no provider): /notify asks before it
stores a message, and the fallback asks when a channel failed for good (docs/ARCHITECTURE.md,
"Users and channels"). A channel is skipped when the user has no address on it, opted out of
it (invariant 14), or it cannot carry this message: free text to a closed WhatsApp window
(invariant 5), a template with no copy on that channel, free text by email with no subject,
media by email.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from bot.models import Contact
from bot.channels.whatsapp.whatsapp import within_window
from bot.vocabulary import Channel, Consent


class Unusable(StrEnum):
    """Why a channel cannot carry a message (said in 4xx answers and fallback events)."""

    NO_ADDRESS = "no_address"
    OPTED_OUT = "opted_out"
    WINDOW_CLOSED = "window_closed"
    NO_COPY = "no_copy"  # the template has no copy on this channel
    NO_SUBJECT = "no_subject"  # free text by email needs a subject
    MEDIA = "media"  # email here carries no attachments


@dataclass(frozen=True)
class Content:
    """What a notification says, as far as the choice of channel cares."""

    body: str | None = None
    subject: str | None = None
    template: str | None = None
    has_media: bool = False
    #: The template has an approved WhatsApp template (a ContentSid) / email copy.
    whatsapp_template: bool = False
    email_template: bool = False


def unusable(contact: Contact, channel: str, content: Content, *, stop_waiting: bool = False,
             at: datetime | None = None) -> Unusable | None:
    """Why `channel` cannot carry `content` to `contact` now (or at `at`, when the message is held
    until then: the 24-hour window must still be open), or None if it can.

    `stop_waiting`: the contact sent a WhatsApp opt-out the engine has not handled yet.
    """
    if not contact.address_on(channel):
        return Unusable.NO_ADDRESS
    if channel == Channel.EMAIL:
        if contact.email_consent == Consent.OPTED_OUT:
            return Unusable.OPTED_OUT
        if content.has_media:
            return Unusable.MEDIA
        if content.template is not None:
            return None if content.email_template else Unusable.NO_COPY
        return None if content.subject else Unusable.NO_SUBJECT
    if contact.consent == Consent.OPTED_OUT or stop_waiting:
        return Unusable.OPTED_OUT
    if content.template is not None:
        return None if content.whatsapp_template else Unusable.NO_COPY
    return None if within_window(contact.last_inbound_at, at) else Unusable.WINDOW_CLOSED


def choose(contact: Contact, content: Content, *, pinned: str | None = None, exclude: frozenset[str] = frozenset(),
           stop_waiting: bool = False, at: datetime | None = None) -> tuple[str | None, dict[str, Unusable]]:
    """The first usable channel in the user's order (only `pinned` when given; never one in
    `exclude`, the channels already tried), and why each channel before it was skipped. `at`:
    when a held message will leave (None: now)."""
    order = [pinned] if pinned else [c for c in contact.channel_order if c not in exclude]
    skipped: dict[str, Unusable] = {}
    for channel in order:
        reason = unusable(contact, channel, content, stop_waiting=stop_waiting, at=at)
        if reason is None:
            return channel, skipped
        skipped[channel] = reason
    return None, skipped
