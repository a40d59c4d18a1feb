"""One fallback per notification: when a channel fails for good, the next one in the user's order.

Invariant 13 (docs/ARCHITECTURE.md, "Fallback"): a notification that failed for good on its
channel — WhatsApp could not reach the person (63003 unreachable, 63024 not a WhatsApp user,
63032/63049 Meta withheld a marketing template), or the send was refused because the window
closed or the person opted out of WhatsApp meanwhile; an email bounced or was dropped — gets
one new message on the next usable channel, linked by `fallback_of`. Never a second fallback
(a fallback has none of its own, and `fallback_of` is unique), never back to the channel
tried, never to an opted-out channel, never on a timer: WhatsApp retries delivery for days, so
only a final failure counts. Written in the transaction that records the failure, with its
event, so a rolled-back failure makes no fallback.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError

from bot.delivery import events, outbox, routing
from bot.delivery.routing import Content
from bot.extensions import db
from bot.metrics import counters as metrics
from bot.models import Contact, Message
from bot.vocabulary import Channel, Direction, EventType, Kind, MessageStatus

#: WhatsApp errors after which the person is better reached another way: the number cannot be
#: reached on WhatsApp, or Meta will not deliver this template to them.
WHATSAPP_UNREACHABLE = frozenset({63003, 63024, 63032, 63049})
#: Our own refusals at send time that another channel can get around: the 24-hour window closed
#: (63016) or the person opted out of WhatsApp (21610) after /notify chose it.
WHATSAPP_REFUSED = frozenset({63016, 21610})
#: The messages that fall back: a backend's notifications and broadcasts (replies belong to the
#: conversation).
FALLS_BACK = frozenset({Kind.NOTIFICATION, Kind.BROADCAST})
#: A final status that is a failure.
FINAL_FAILURES = frozenset({MessageStatus.FAILED, MessageStatus.UNDELIVERED})


def warrants_fallback(message: Message) -> bool:
    """Whether this failed message is one whose person another channel might reach."""
    if message.direction != Direction.OUTBOUND or message.fallback_of is not None or message.kind not in FALLS_BACK:
        return False
    if message.channel == Channel.EMAIL:
        return True  # a bounce or a drop: the address does not take our mail
    return message.error_code in WHATSAPP_UNREACHABLE | WHATSAPP_REFUSED


def content_of(message: Message, contact: Contact) -> Content:
    """What the message says, as the choice of channel sees it, in the contact's locale: a
    template's copy on the next channel must be in their language too (bot/locales.py)."""
    if message.template is None:
        return Content(body=message.body, subject=message.subject, has_media=bool(message.media_urls))
    copy = routing.template_copy(message.template, contact.locale, direct_sid=message.content_sid)
    return copy.content(message.template, body=message.body, subject=message.subject,
                        has_media=bool(message.media_urls))


def consider(message: Message) -> Message | None:
    """After `message` failed for good: queue its one fallback, or say why there is none.

    Does not commit: the caller's transaction records the failure, the fallback and its event.
    Returns the fallback message, if one was made.
    """
    if not warrants_fallback(message):
        return None
    contact = db.session.get(Contact, message.contact_id)
    if contact is None or contact.user_id is None:
        return None  # a phone-only contact has no other channel: nothing to say
    content = content_of(message, contact)
    channel, skipped = routing.choose(contact, content, exclude=frozenset({message.channel}))
    if channel is None:
        _report(message, None, reasons={name: str(reason) for name, reason in skipped.items()})
        return None
    fallback = Message(
        direction=Direction.OUTBOUND, kind=message.kind, contact_id=message.contact_id, channel=channel,
        fallback_of=message.id, subject=message.subject, body=message.body, template=message.template,
        content_sid=(message.content_sid or routing.template_copy(message.template, contact.locale).content_sid)
        if channel == Channel.WHATSAPP and message.template is not None else None,
        variables=message.variables, status=MessageStatus.PENDING, status_rank=MessageStatus.PENDING.rank,
        backend_metadata=message.backend_metadata, conversation_id=message.conversation_id,
        broadcast_id=message.broadcast_id,
        # Its original's quiet hours: the sender holds the fallback, too, until they end (invariant 15).
        quiet_hours=message.quiet_hours,
        # Its own copy's locale on the new channel, resolved now from the person's locale (as
        # `content_of` checked it exists) and fixed from here: its email is rendered in it.
        locale=routing.message_locale(channel, message.template, contact.locale),
    )
    try:
        with db.session.begin_nested():
            db.session.add(fallback)
    except IntegrityError:
        return None  # another transaction made this message's fallback first (fallback_of is unique)
    outbox.defer_send(fallback)
    _report(message, fallback)
    return fallback


def _report(message: Message, fallback: Message | None, reasons: dict[str, Any] | None = None) -> None:
    metrics.fallback(message.channel, fallback.channel if fallback else None)
    events.emit(EventType.MESSAGE_FALLBACK, {
        "message_id": message.id,
        "channel": message.channel,
        "error_code": message.error_code,
        "fallback_id": fallback.id if fallback else None,
        "fallback_channel": fallback.channel if fallback else None,
        "skipped": reasons or {},
        "metadata": message.backend_metadata,
        "broadcast_id": message.broadcast_id,
    }, contact_id=message.contact_id, message_id=message.id)


def after_failures(messages: list[Message]) -> None:
    """Consider a fallback for each message that just moved to a final failure."""
    for message in messages:
        if message.status in FINAL_FAILURES:
            consider(message)


