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

from bot import locales
from bot.locales import Copy
from bot.models import Contact
from bot.channels.whatsapp.whatsapp import within_window
from bot.vocabulary import Channel, Consent


class Unusable(StrEnum):
    """Why a channel cannot carry a message (said in 4xx answers and fallback events)."""

    NO_ADDRESS = "no_address"
    OPTED_OUT = "opted_out"
    WINDOW_CLOSED = "window_closed"
    NO_COPY = "no_copy"  # the template has no copy on this channel
    #: The template has copy on this channel, but in no language the user's locale resolves to
    #: (bot/locales.py): never sent in another language.
    NO_COPY_IN_LOCALE = "no_copy_in_locale"
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
    #: The template has copy on that channel, only not in the user's language (NO_COPY_IN_LOCALE).
    whatsapp_other_locales: bool = False
    email_other_locales: bool = False


@dataclass(frozen=True)
class TemplateCopy:
    """A template's copy on each channel for one user's locale (bot/locales.py)."""

    #: The approved WhatsApp template's ContentSid in the user's language; None: none matches.
    content_sid: str | None = None
    whatsapp_other_locales: bool = False
    email: bool = False
    email_other_locales: bool = False

    def content(self, template: str, **fields: object) -> Content:
        """The `Content` of a notification naming this template."""
        return Content(template=template, whatsapp_template=self.content_sid is not None,
                       whatsapp_other_locales=self.whatsapp_other_locales, email_template=self.email,
                       email_other_locales=self.email_other_locales, **fields)  # type: ignore[arg-type]


def template_copy(template: str, locale: str | None, *, direct_sid: str | None = None) -> TemplateCopy:
    """Which copy of `template` a user whose locale is `locale` gets on each channel: exact,
    its language, the default locale; `direct_sid`, a ContentSid the backend named itself, is
    taken as it is (the backend chose its language)."""
    if direct_sid is not None:
        sid, whatsapp_elsewhere = direct_sid, False
    else:
        sid = locales.content_sid(template, locale)
        whatsapp_elsewhere = sid is None and bool(locales.available_locales(Copy.WHATSAPP, template))
    email = locales.template_locale(Copy.EMAIL, template, locale) is not None
    email_elsewhere = not email and bool(locales.available_locales(Copy.EMAIL, template))
    return TemplateCopy(sid, whatsapp_elsewhere, email, email_elsewhere)


def message_locale(channel: str, template: str | None, locale: str | None) -> str | None:
    """The locale a message's copy on `channel` is in, for a person whose locale is `locale`:
    a template's email copy, or the key of its ContentSid in TWILIO_CONTENT_SIDS (a bare SID is
    DEFAULT_LOCALE's). None for text the backend wrote, a ContentSid it named itself, or no copy
    that matches. Stored on the message when it is made (docs/ARCHITECTURE.md, "Languages")."""
    if template is None:
        return None
    kind = Copy.EMAIL if channel == Channel.EMAIL else Copy.WHATSAPP
    return locales.template_locale(kind, template, locale)


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
            return None if content.email_template else _no_copy(content.email_other_locales)
        return None if content.subject else Unusable.NO_SUBJECT
    if contact.consent == Consent.OPTED_OUT or stop_waiting:
        return Unusable.OPTED_OUT
    if content.template is not None:
        return None if content.whatsapp_template else _no_copy(content.whatsapp_other_locales)
    return None if within_window(contact.last_inbound_at, at) else Unusable.WINDOW_CLOSED


def _no_copy(in_other_locales: bool) -> Unusable:
    return Unusable.NO_COPY_IN_LOCALE if in_other_locales else Unusable.NO_COPY


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
