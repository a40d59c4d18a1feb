"""The server's vocabularies: every status, consent state, direction and kind, named once.

They are `StrEnum`s, so a member *is* its stored string: columns keep plain text, JSON answers
and the HTTP contract are unchanged, and `row.status == MessageStatus.SENT` holds for a row read
back from the database. No module spells one of these values as a bare literal
(tests/test_architecture.py checks).
"""
from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """Where a message is. Outbound statuses are ranked and only ever move up (RANK below);
    Twilio's names are used as Twilio spells them, ours (pending, dispatching, retrying) beside."""

    PENDING = "pending"  # committed, its send task enqueued (the outbox)
    DISPATCHING = "dispatching"  # claimed by one send, with a lease
    RETRYING = "retrying"  # a transient failure; tried again at next_attempt_at
    ACCEPTED = "accepted"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    CANCELED = "canceled"  # Twilio's spelling (Messaging Service scheduling)
    READ = "read"
    # Inbound messages: stored by the webhook, then handled by the engine. An inbound message
    # whose turn kept failing on a database error retrying cannot fix ends FAILED instead (the
    # reason in error_message), so the contact's next message can go on (invariant 6).
    RECEIVED = "received"
    PROCESSED = "processed"

    @property
    def rank(self) -> int:
        """The order statuses may move in: a callback only ever raises the rank."""
        return RANK[self]


#: pending < dispatching/retrying < accepted/scheduled < queued < sending < sent < final < read.
#: Inbound received/processed rank 0: status callbacks never touch inbound rows. An inbound row
#: given up on takes FAILED's final rank, like any message that will not move again.
RANK: dict[MessageStatus, int] = {
    MessageStatus.PENDING: 0,
    MessageStatus.DISPATCHING: 1,
    MessageStatus.RETRYING: 1,
    MessageStatus.ACCEPTED: 2,
    MessageStatus.SCHEDULED: 2,
    MessageStatus.QUEUED: 3,
    MessageStatus.SENDING: 4,
    MessageStatus.SENT: 5,
    MessageStatus.DELIVERED: 6,
    MessageStatus.UNDELIVERED: 6,
    MessageStatus.FAILED: 6,
    MessageStatus.CANCELED: 6,
    MessageStatus.READ: 7,
    MessageStatus.RECEIVED: 0,
    MessageStatus.PROCESSED: 0,
}

#: The statuses an outbound message can take (what a status callback may name).
OUTBOUND_STATUSES = frozenset(RANK) - {MessageStatus.RECEIVED, MessageStatus.PROCESSED}
#: Twilio's statuses of an inbound message; a status callback carrying one is about a message we
#: received (Twilio sends them to the same URL) and is ignored.
INBOUND_CALLBACK_STATUSES = frozenset({"receiving", MessageStatus.RECEIVED.value})


def parse_outbound_status(value: str) -> MessageStatus | None:
    """The outbound status Twilio named, or None for one we do not know (Twilio adds them)."""
    try:
        status = MessageStatus(value)
    except ValueError:
        return None
    return status if status in OUTBOUND_STATUSES else None


class Consent(StrEnum):
    """A contact's consent state."""

    UNKNOWN = "unknown"
    OPTED_IN = "opted_in"
    OPTED_OUT = "opted_out"


class Channel(StrEnum):
    """How a message reaches a person: one package per channel in bot/channels."""

    WHATSAPP = "whatsapp"
    EMAIL = "email"


#: A user's channel order when they have none of their own: WhatsApp first, as the system this
#: server replaces did, then email.
DEFAULT_CHANNELS = (Channel.WHATSAPP, Channel.EMAIL)


class ConsentAction(StrEnum):
    """What one entry of the consent ledger records."""

    OPT_IN = "opt_in"
    OPT_OUT = "opt_out"
    DECLINED = "declined"  # said no to an opt-in question; consent stays unknown


class Direction(StrEnum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


class Kind(StrEnum):
    """Why a message exists; only an opt-out confirmation may reach an opted-out contact."""

    NOTIFICATION = "notification"
    #: One recipient's copy of a broadcast: the broadcast lane, the bulk share of the rate.
    BROADCAST = "broadcast"
    REPLY = "reply"
    OPT_OUT_CONFIRMATION = "opt_out_confirm"
    #: Written by a person during a human handoff (POST /notify with "agent").
    AGENT = "agent"
    #: Inbound: any message, or one that asks to opt out (marked when stored, so the send path
    #: can honour a STOP the engine has not processed yet with one indexed lookup).
    INBOUND = "inbound"
    OPT_OUT_REQUEST = "opt_out_request"


class HoldReason(StrEnum):
    """Why an outbound message is held in the database (invariant 15; GET /messages `held_reason`)."""

    SCHEDULED = "scheduled"  # the backend's send_at
    QUIET_HOURS = "quiet_hours"  # its time fell inside the recipient's quiet hours


class ConversationStatus(StrEnum):
    STARTING = "starting"  # started by the backend, waiting for the worker
    ACTIVE = "active"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"  # opt-out, replaced by a newer conversation, or canceled before it started
    FAILED = "failed"


#: A conversation that is still running (at most one per contact).
OPEN_CONVERSATION = (ConversationStatus.STARTING, ConversationStatus.ACTIVE)


class IdempotentKind(StrEnum):
    """What an Idempotency-Key created: one key space for messages and flows (invariant 2)."""

    MESSAGE = "message"
    CONVERSATION = "conversation"
    BROADCAST = "broadcast"


class StartedBy(StrEnum):
    USER = "user"
    BACKEND = "backend"


class EventType(StrEnum):
    """What an event to the backend reports (docs/api.md, "Events to your backend")."""

    MESSAGE_STATUS = "message.status"
    MESSAGE_RECEIVED = "message.received"
    CONVERSATION_STARTED = "conversation.started"
    CONVERSATION_COMPLETED = "conversation.completed"
    CONVERSATION_EXPIRED = "conversation.expired"
    CONVERSATION_CANCELLED = "conversation.cancelled"
    CONVERSATION_FAILED = "conversation.failed"
    CONVERSATION_HELD = "conversation.held"
    CONTACT_OPTED_IN = "contact.opted_in"
    CONTACT_OPTED_OUT = "contact.opted_out"
    CONTACT_HANDOFF_STARTED = "contact.handoff_started"
    CONTACT_HANDOFF_ENDED = "contact.handoff_ended"
    #: A message failed for good on its channel: the fallback made on the next one, or why none.
    MESSAGE_FALLBACK = "message.fallback"
    #: A broadcast ended (every recipient's message left or failed, or it was canceled), with its counts.
    BROADCAST_COMPLETED = "broadcast.completed"
    #: A message is held in the database until a time (its send_at, or quiet hours ending).
    MESSAGE_HELD = "message.held"
    #: A held (or not yet sent) message was canceled by the backend: it will never leave.
    MESSAGE_CANCELED = "message.canceled"


class BroadcastState(StrEnum):
    """Where a broadcast is (docs/delivery.md, "Broadcasts"): waiting for `send_at`, its audience
    being resolved into recipients, its messages being released at the bulk share of the rate,
    done, or stopped by POST /broadcasts/<id>/cancel."""

    SCHEDULED = "scheduled"
    EXPANDING = "expanding"
    SENDING = "sending"
    COMPLETED = "completed"
    CANCELED = "canceled"


#: A broadcast still at work: the pump has something to do for it.
LIVE_BROADCAST = (BroadcastState.SCHEDULED, BroadcastState.EXPANDING, BroadcastState.SENDING)


class EventStatus(StrEnum):
    """Where an event's delivery to EVENTS_WEBHOOK_URL is."""

    PENDING = "pending"  # to be delivered (now, or at next_attempt_at after a failed attempt)
    DELIVERING = "delivering"  # claimed by one delivery, with a lease
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # the retry schedule ran out: replay with POST /events/<id>/retry
    STORED = "stored"  # kept, not pushed: no EVENTS_WEBHOOK_URL, or EVENTS_TYPES leaves it out


#: The message statuses a backend hears of (message.status): Twilio's progress, not our own steps.
REPORTED_STATUSES = frozenset({MessageStatus.QUEUED, MessageStatus.SENT, MessageStatus.DELIVERED,
                               MessageStatus.READ, MessageStatus.UNDELIVERED, MessageStatus.FAILED})
