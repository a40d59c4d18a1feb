"""The data model: contacts, messages (both directions) and the append-only status events."""
from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from bot.clock import isoformat, utcnow
from bot.extensions import db
from bot.vocabulary import (DEFAULT_CHANNELS, OPEN_CONVERSATION, Channel, Consent, ConversationStatus, Direction,
                            EventStatus, HoldReason, Kind, MessageStatus)


def _where(column: str, values: tuple[str, ...], also: str = "") -> sa.TextClause:
    """A partial index's predicate, `[also AND ]column IN (values...)`, spelled from the vocabulary."""
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.text(f"{also + ' AND ' if also else ''}{column} IN ({listed})")


#: Messages not final yet, failed for good, still to leave: the rows the partial indexes read by
#: `bot/metrics/readings.py` hold (migration 0011_metrics_indexes, docs/metrics.md).
LIVE_MESSAGE_STATUSES = (MessageStatus.PENDING, MessageStatus.DISPATCHING, MessageStatus.RETRYING,
                         MessageStatus.ACCEPTED, MessageStatus.SCHEDULED, MessageStatus.QUEUED,
                         MessageStatus.SENDING, MessageStatus.RECEIVED)
FAILED_MESSAGE_STATUSES = (MessageStatus.FAILED, MessageStatus.UNDELIVERED)
UNSENT_MESSAGE_STATUSES = (MessageStatus.PENDING, MessageStatus.DISPATCHING, MessageStatus.RETRYING)
_OUTBOUND = f"direction = '{Direction.OUTBOUND.value}'"
_LIVE = _where("status", LIVE_MESSAGE_STATUSES)
_FAILED = _where("status", FAILED_MESSAGE_STATUSES, _OUTBOUND)
_UNSENT_OUT = _where("status", UNSENT_MESSAGE_STATUSES, _OUTBOUND)
_IN_HANDOFF = sa.text("handoff_until IS NOT NULL")
_OPEN = _where("status", OPEN_CONVERSATION)


def new_id() -> str:
    """A random public id: ids given to backends should not reveal how many rows exist."""
    return uuid.uuid4().hex


#: What `new_id` makes: 32 lowercase hex digits, nothing after them.
PUBLIC_ID = re.compile(r"[0-9a-f]{32}\Z")


def is_public_id(value: str) -> bool:
    """Whether `value` can be one of our ids. A route checks it before any query: a NUL or a
    megabyte of text in the path is a 404, never a database error."""
    return bool(PUBLIC_ID.match(value))


def hold_reason(send_at: datetime | None, not_before: datetime | None) -> str | None:
    """Why a message held until `not_before` waits: its schedule, or quiet hours that moved it
    past its `send_at` (or it had none); None when it is not held."""
    if not_before is None:
        return None
    if send_at is not None and not_before <= send_at:
        return HoldReason.SCHEDULED.value
    return HoldReason.QUIET_HOURS.value


class Contact(db.Model):
    """A person: a user of the backend (`user_id`, with a phone, an email or both), or a WhatsApp
    user who wrote first (a phone, no `user_id` yet). One person, one row: a phone or an email
    belongs to at most one contact (docs/ARCHITECTURE.md, "Users and channels").
    """

    __tablename__ = "contacts"
    __table_args__ = (
        sa.Index("ix_contacts_handoff", "handoff_until", postgresql_where=_IN_HANDOFF, sqlite_where=_IN_HANDOFF),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: E.164, e.g. +15551234567; empty for a user known only by email.
    phone: Mapped[str | None] = mapped_column(sa.String(16), unique=True)
    #: The backend's own id of this person (PUT /users/<user_id>); empty for a phone-only contact.
    user_id: Mapped[str | None] = mapped_column(sa.String(128), unique=True)
    #: Lowercased, so one address is one person however the backend spells it.
    email: Mapped[str | None] = mapped_column(sa.String(254), unique=True)
    name: Mapped[str | None] = mapped_column(sa.String(256))
    locale: Mapped[str | None] = mapped_column(sa.String(35))  # BCP 47, e.g. pt-BR
    timezone: Mapped[str | None] = mapped_column(sa.String(64))  # IANA, e.g. America/Sao_Paulo
    #: The order of channels to try (["whatsapp", "email"]); empty: vocabulary.DEFAULT_CHANNELS.
    channels: Mapped[list[str] | None] = mapped_column(sa.JSON)
    #: Email consent, apart from WhatsApp's (`consent`): invariant 14.
    email_consent: Mapped[str] = mapped_column(sa.String(16), default=Consent.UNKNOWN,
                                               server_default=Consent.UNKNOWN.value)
    wa_id: Mapped[str | None] = mapped_column(sa.String(32))
    profile_name: Mapped[str | None] = mapped_column(sa.String(256))
    consent: Mapped[str] = mapped_column(sa.String(16), default=Consent.UNKNOWN, server_default=Consent.UNKNOWN.value)
    last_inbound_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: While set and in the future, a person answers this contact, not the bot (human handoff).
    handoff_until: Mapped[datetime | None] = mapped_column(sa.DateTime)
    handoff_reason: Mapped[str | None] = mapped_column(sa.String(500))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)

    messages: Mapped[list["Message"]] = relationship(back_populates="contact", lazy="raise_on_sql")

    @property
    def whatsapp_address(self) -> str:
        return "whatsapp:" + (self.phone or "")

    @property
    def channel_order(self) -> list[str]:
        """The channels to try, in the user's order (the default order when they set none)."""
        return list(self.channels or DEFAULT_CHANNELS)

    def consent_on(self, channel: str) -> str:
        """This person's consent on one channel (invariant 14: each channel has its own)."""
        return self.email_consent if channel == Channel.EMAIL else self.consent

    def address_on(self, channel: str) -> str | None:
        """Where a message on `channel` goes: the phone for WhatsApp, the email address for email."""
        return self.email if channel == Channel.EMAIL else self.phone


class Message(db.Model):
    """One message, outbound (a notification or a reply) or inbound (from the user), on one channel.

    Outbound rows are the outbox: committed as `pending` before their send task is enqueued, then
    claimed (`dispatching`, with a lease until `claimed_until`) by exactly one send.
    """

    __tablename__ = "messages"
    __table_args__ = (
        sa.Index("ix_messages_outbox", "status", "next_attempt_at"),
        sa.Index("ix_messages_contact_created", "contact_id", "created_at"),
        # A broadcast's counts and how many of its messages are still unsent (the pump's window).
        sa.Index("ix_messages_broadcast_status", "broadcast_id", "status"),
        # The dashboard's message log, newest first (keyset pages).
        sa.Index("ix_messages_created", "created_at", "id"),
        # What a /metrics scrape reads (bot/metrics/readings.py): a few rows each, whatever is stored.
        sa.Index("ix_messages_live", "channel", "direction", "status", postgresql_where=_LIVE, sqlite_where=_LIVE),
        sa.Index("ix_messages_failed_recent", "updated_at", "channel", "error_code", postgresql_where=_FAILED,
                 sqlite_where=_FAILED),
        sa.Index("ix_messages_unsent_lane", "channel", "kind", "created_at", postgresql_where=_UNSENT_OUT,
                 sqlite_where=_UNSENT_OUT),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    direction: Mapped[str] = mapped_column(sa.String(8))
    kind: Mapped[str] = mapped_column(sa.String(16), default=Kind.NOTIFICATION, server_default=Kind.NOTIFICATION.value)
    contact_id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id"))
    conversation_id: Mapped[str | None] = mapped_column(sa.ForeignKey("conversations.id"), index=True)
    channel: Mapped[str] = mapped_column(sa.String(16), default=Channel.WHATSAPP,
                                         server_default=Channel.WHATSAPP.value)
    #: The email's subject (also kept on a WhatsApp message, for the email its fallback would be).
    subject: Mapped[str | None] = mapped_column(sa.String(998))
    body: Mapped[str | None] = mapped_column(sa.Text)
    template: Mapped[str | None] = mapped_column(sa.String(128))
    content_sid: Mapped[str | None] = mapped_column(sa.String(34))
    variables: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    media_urls: Mapped[list[str] | None] = mapped_column(sa.JSON)
    #: Inbound only: every form field Twilio sent (media, location, buttons, referral...).
    payload: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    twilio_sid: Mapped[str | None] = mapped_column(sa.String(34), unique=True)
    #: The email provider's id of an accepted email (SendGrid's X-Message-Id).
    provider_message_id: Mapped[str | None] = mapped_column(sa.String(128), index=True)
    #: The message this one replaces on another channel (invariant 13: unique, so at most one
    #: fallback per message; a fallback never has one of its own).
    fallback_of: Mapped[str | None] = mapped_column(sa.ForeignKey("messages.id"), unique=True)
    status: Mapped[str] = mapped_column(sa.String(16))  # MessageStatus
    status_rank: Mapped[int] = mapped_column(sa.SmallInteger, default=0)
    error_code: Mapped[int | None] = mapped_column(sa.Integer)
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    claimed_until: Mapped[datetime | None] = mapped_column(sa.DateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: Held until then (invariant 15): a `pending` row is not claimed before this instant (its
    #: send_at, or the end of the recipient's quiet hours: bot/delivery/holding.py). Cleared when
    #: the release (bot/delivery/release.py) or a claim takes it; indexed for the release's check.
    not_before: Mapped[datetime | None] = mapped_column(sa.DateTime, index=True)
    #: The time the backend asked for (POST /notify `send_at`), kept to say why it is held.
    send_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: The quiet hours (`HH:MM-HH:MM`) that applied when it was made: the request's, else
    #: QUIET_HOURS; a broadcast's own; a fallback its original's. The sender checks them again, in
    #: the recipient's timezone, when it sends (invariant 15). None: never held for quiet hours
    #: (replies, opt-out confirmations, agents' messages, a request's `"quiet_hours": null`).
    quiet_hours: Mapped[str | None] = mapped_column(sa.String(11))
    #: The locale its copy was resolved to when it was made (bot/locales.py: exact, its language,
    #: DEFAULT_LOCALE): the ContentSid's, the email copy's (rendered in it at send time, whatever
    #: the contact's locale is by then), a flow reply's; a fallback's from its original's. None:
    #: text the backend wrote, a ContentSid it named itself (docs/ARCHITECTURE.md, "Languages").
    locale: Mapped[str | None] = mapped_column(sa.String(35))
    #: When the current (or last) send attempt began: the lookup's "since" if its fate is unknown.
    attempt_started_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: The backend's own object (POST /notify "metadata", at most 4 KB), echoed in its events.
    #: ("metadata" is the column; the attribute name is taken by SQLAlchemy.)
    backend_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", sa.JSON)
    #: Set when an earlier attempt may have been accepted by Twilio (a lease that expired, a
    #: connection dropped after the request was written, a 502/504, a failed commit of the SID):
    #: the next attempt first looks Twilio up for a message sent since then (invariant 2).
    unsure_since: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: When the reconciliation job last asked Twilio for this message's status.
    reconciled_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: The broadcast this message is one recipient's copy of (it rides the broadcast lane and
    #: the bulk share of the rate: docs/delivery.md, "Broadcasts"); its fallback keeps it too.
    broadcast_id: Mapped[str | None] = mapped_column(sa.ForeignKey("broadcasts.id"))

    contact: Mapped[Contact] = relationship(back_populates="messages")
    events: Mapped[list["StatusEvent"]] = relationship(
        back_populates="message", order_by="StatusEvent.id", lazy="raise_on_sql"
    )

    @property
    def is_held(self) -> bool:
        """Waiting in the database for `not_before` (invariant 15)."""
        return self.not_before is not None and self.status == MessageStatus.PENDING

    @property
    def hold_reason(self) -> str | None:
        """Why it is held (`hold_reason`); None when it is not held."""
        return hold_reason(self.send_at, self.not_before) if self.is_held else None

    def to_dict(self, events: list["StatusEvent"] | None = None) -> dict[str, Any]:
        """The JSON shape of GET /messages/<id> (events included when given)."""
        data: dict[str, Any] = {
            "id": self.id,
            "direction": self.direction,
            "kind": self.kind,
            "conversation_id": self.conversation_id,
            "channel": self.channel,
            "user_id": self.contact.user_id,
            "to": self.contact.address_on(self.channel) if self.direction == Direction.OUTBOUND else None,
            "from": self.contact.address_on(self.channel) if self.direction == Direction.INBOUND else None,
            "subject": self.subject,
            "fallback_of": self.fallback_of,
            "fallback": None,  # the replacing message's id: GET /messages/<id> looks it up
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "twilio_sid": self.twilio_sid,
            "provider_message_id": self.provider_message_id,
            "body": self.body,
            "template": self.template,
            "variables": self.variables,
            "media_urls": self.media_urls or [],
            "attempts": self.attempts,
            "metadata": self.backend_metadata,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "sent_at": isoformat(self.sent_at),
            "broadcast_id": self.broadcast_id,
            "send_at": isoformat(self.send_at),
            "held_until": isoformat(self.not_before) if self.is_held else None,
            "held_reason": self.hold_reason,
            "locale": self.locale,
        }
        if events is not None:
            data["events"] = [event.to_dict() for event in events]
        return data


class StatusEvent(db.Model):
    """One status callback from Twilio, kept forever (append-only).

    `message_id` is empty when the callback arrived before the send recorded its SID; the event is
    linked and applied as soon as the SID is known.
    """

    __tablename__ = "status_events"
    __table_args__ = (sa.UniqueConstraint("twilio_sid", "status", name="uq_status_events_sid_status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[str | None] = mapped_column(sa.ForeignKey("messages.id"), index=True)
    twilio_sid: Mapped[str] = mapped_column(sa.String(34), index=True)
    status: Mapped[str] = mapped_column(sa.String(32))
    error_code: Mapped[int | None] = mapped_column(sa.Integer)
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    received_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)

    message: Mapped[Message | None] = relationship(back_populates="events")

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "received_at": isoformat(self.received_at),
        }


class PeriodicRun(db.Model):
    """When a periodic job last ran: lets any number of consumers share one schedule."""

    __tablename__ = "periodic_runs"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    last_run_at: Mapped[datetime] = mapped_column(sa.DateTime)


class Conversation(db.Model):
    """One run of a flow with one contact: its state, its data and, at the end, its outcome.

    A contact has at most one open conversation (guaranteed by the per-contact lock of the engine).
    """

    __tablename__ = "conversations"
    __table_args__ = (
        sa.Index("ix_conversations_contact_status", "contact_id", "status"),
        sa.Index("ix_conversations_status_expires", "status", "expires_at"),
        sa.Index("ix_conversations_open_flow", "flow", postgresql_where=_OPEN, sqlite_where=_OPEN),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    contact_id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id"))
    flow: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16), default=ConversationStatus.ACTIVE)
    #: The variables the backend started it with (kept to restart a flow whose state vanished).
    variables: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    started_by: Mapped[str] = mapped_column(sa.String(16))  # StartedBy
    error: Mapped[str | None] = mapped_column(sa.Text)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    started_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: The backend's metadata from the POST /notify that started it, echoed in its events.
    backend_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", sa.JSON)
    #: Failed starts so far, and when the sweep may enqueue it again (a hold-off, as for messages).
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: A backend-started flow held until then (invariant 15), still `starting`: its send_at, or
    #: the end of the user's quiet hours (bot/delivery/holding.py). Cleared when the release
    #: (bot/delivery/release.py) lets it start; indexed for the release's check.
    not_before: Mapped[datetime | None] = mapped_column(sa.DateTime, index=True)
    #: The time the backend asked for (POST /notify `send_at` with `flow`), kept to say why it waits.
    send_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: The quiet hours that applied when it was asked for (the request's, else QUIET_HOURS): its
    #: first messages carry them, so the sender holds those too; its replies to the user never.
    quiet_hours: Mapped[str | None] = mapped_column(sa.String(11))

    contact: Mapped[Contact] = relationship()

    @property
    def is_held(self) -> bool:
        """Waiting in the database for `not_before` before it starts (invariant 15)."""
        return self.not_before is not None and self.status == ConversationStatus.STARTING

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of GET /conversations/<id>."""
        return {
            "id": self.id,
            "contact": self.contact.phone,
            "flow": self.flow,
            "state": self.state,
            "status": self.status,
            "outcome": self.outcome,
            "data": self.data,
            "started_by": self.started_by,
            "metadata": self.backend_metadata,
            "error": self.error,
            "started_at": isoformat(self.started_at),
            "updated_at": isoformat(self.updated_at),
            "expires_at": isoformat(self.expires_at),
            "ended_at": isoformat(self.ended_at),
            "send_at": isoformat(self.send_at),
            "held_until": isoformat(self.not_before) if self.is_held else None,
            "held_reason": hold_reason(self.send_at, self.not_before) if self.is_held else None,
            "quiet_hours": self.quiet_hours,
        }


class IdempotencyKey(db.Model):
    """One Idempotency-Key of POST /notify and what its first request created.

    The one key space for messages and flows: written in the same transaction as the message or
    conversation, so two concurrent requests with one key create one thing whatever they ask for
    (the primary key decides; the loser answers with the winner's answer or a 422).
    """

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))  # IdempotentKind
    target_id: Mapped[str] = mapped_column(sa.String(32))  # the message's or conversation's id
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)


class ConsentEvent(db.Model):
    """The append-only consent ledger: every opt-in and opt-out, who, when, how, which words."""

    __tablename__ = "consent_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    contact_id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id"), index=True)
    channel: Mapped[str] = mapped_column(sa.String(16), default=Channel.WHATSAPP,
                                         server_default=Channel.WHATSAPP.value)
    action: Mapped[str] = mapped_column(sa.String(16))  # ConsentAction
    previous: Mapped[str] = mapped_column(sa.String(16))  # the consent state before
    source: Mapped[str] = mapped_column(sa.String(32))  # keyword / api / sandbox_join / twilio_opt_out
    words: Mapped[str | None] = mapped_column(sa.Text)
    message_sid: Mapped[str | None] = mapped_column(sa.String(34))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "action": self.action,
            "previous": self.previous,
            "source": self.source,
            "words": self.words,
            "message_sid": self.message_sid,
            "at": isoformat(self.created_at),
        }


class current_txid(FunctionElement):  # noqa: N801 (an SQL function, named as one)
    """The writing transaction's id on PostgreSQL (`pg_current_xact_id()`, a 64-bit xid8); 0 on
    SQLite, whose single writer already commits in the order rows are inserted."""

    type = sa.BigInteger()
    inherit_cache = True


class finished_txid_horizon(FunctionElement):  # noqa: N801
    """Every transaction id below this has ended (committed or rolled back): on PostgreSQL the
    xmin of the current snapshot (`pg_snapshot_xmin(pg_current_snapshot())`), the oldest
    transaction still running anywhere in the cluster; on SQLite above every `current_txid`."""

    type = sa.BigInteger()
    inherit_cache = True


@compiles(current_txid)
def _txid_elsewhere(element: current_txid, compiler: SQLCompiler, **kw: Any) -> str:
    return "0"


@compiles(current_txid, "postgresql")
def _txid_postgresql(element: current_txid, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT)"


@compiles(finished_txid_horizon)
def _horizon_elsewhere(element: finished_txid_horizon, compiler: SQLCompiler, **kw: Any) -> str:
    return "1"


@compiles(finished_txid_horizon, "postgresql")
def _horizon_postgresql(element: finished_txid_horizon, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT)"


_UNFINISHED = sa.text("status IN ('pending', 'delivering')")


class Event(db.Model):
    """A fact for the backend (invariant 12): written in the same transaction as the change it
    reports, then delivered at least once to EVENTS_WEBHOOK_URL, signed, in per-contact order.

    Events are ordered by (`txid`, `seq`): the id of the transaction that wrote the event, then
    its insert order. Only events whose transaction is older than every transaction still
    running are served or pushed (`finished_txid_horizon`), so no event can later appear before
    one already served: the cursor of GET /events is safe whatever order transactions commit in
    (docs/ARCHITECTURE.md, invariant 12). `id` is the public id, the `webhook-id` header of every
    delivery attempt, so receivers deduplicate retries.
    """

    __tablename__ = "events"
    __table_args__ = (
        sa.Index("ix_events_order", "txid", "seq"),
        sa.Index("ix_events_contact_order", "contact_id", "txid", "seq"),
        sa.Index("ix_events_status_next", "status", "next_attempt_at"),
        sa.Index("ix_events_type_order", "type", "txid", "seq"),
        # The few events still to deliver, in order: what the claims and the sweep look through
        # (the table holds EVENTS_RETENTION_DAYS of delivered ones).
        sa.Index("ix_events_unfinished_order", "txid", "seq", postgresql_where=_UNFINISHED, sqlite_where=_UNFINISHED),
    )

    seq: Mapped[int] = mapped_column(primary_key=True)
    #: The writing transaction (see `current_txid`), set by the INSERT itself.
    txid: Mapped[int] = mapped_column(sa.BigInteger, default=current_txid())
    id: Mapped[str] = mapped_column(sa.String(32), unique=True, default=new_id)
    type: Mapped[str] = mapped_column(sa.String(40))  # EventType
    contact_id: Mapped[int | None] = mapped_column(sa.ForeignKey("contacts.id"))
    message_id: Mapped[str | None] = mapped_column(sa.String(32), index=True)
    conversation_id: Mapped[str | None] = mapped_column(sa.String(32))
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    status: Mapped[str] = mapped_column(sa.String(16), default=EventStatus.PENDING)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    claimed_until: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: Who holds the delivery claim: an attempt settles the event only if it still holds it.
    claim_token: Mapped[str | None] = mapped_column(sa.String(32))
    delivered_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: Why the last attempt failed ("HTTP 500", "ConnectTimeout"), for GET /events.
    last_error: Mapped[str | None] = mapped_column(sa.String(200))

    def body(self) -> dict[str, Any]:
        """What the receiver gets: the Standard Webhooks shape {type, timestamp, data}."""
        return {"type": self.type, "timestamp": isoformat(self.created_at), "data": self.data}

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of GET /events: the body, its id, and how its delivery went."""
        return {
            "id": self.id,
            **self.body(),
            "delivery": {
                "status": self.status,
                "attempts": self.attempts,
                "last_error": self.last_error,
                "next_attempt_at": isoformat(self.next_attempt_at) if self.status == EventStatus.PENDING else None,
                "delivered_at": isoformat(self.delivered_at),
            },
        }


class EmailEvent(db.Model):
    """One event of SendGrid's Event Webhook, kept once (its `sg_event_id`; SendGrid repeats
    events routinely and retries a batch for 24 h). `message_id` is ours, from the email's
    `custom_args`; empty for an email this server does not know (acknowledged and counted)."""

    __tablename__ = "email_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    sg_event_id: Mapped[str] = mapped_column(sa.String(100), unique=True)
    message_id: Mapped[str | None] = mapped_column(sa.String(32), index=True)
    event: Mapped[str] = mapped_column(sa.String(32))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    occurred_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    received_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.event, "error_code": None, "error_message": self.reason,
                "received_at": isoformat(self.received_at)}


class ContactTag(db.Model):
    """One tag a backend put on a user (PUT /users/<id> {"tags": [...]}): a broadcast's audience
    may be every user carrying one of some tags. A row per (tag, contact), so the audience is read
    by the primary key's order, a batch at a time (docs/delivery.md, "Broadcasts")."""

    __tablename__ = "contact_tags"

    tag: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    contact_id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True,
                                            index=True)


class Broadcast(db.Model):
    """One message to many (POST /broadcasts): what it says, to whom, and how far it got.

    The request stores the audience as given (`BroadcastTarget`) and answers; the worker resolves
    it into `BroadcastRecipient` rows a batch at a time (skips counted in `skipped`), then
    releases their messages a window at a time at the bulk share of each sender's rate
    (bot/broadcasts/pump.py; docs/delivery.md, "Broadcasts").
    """

    __tablename__ = "broadcasts"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    state: Mapped[str] = mapped_column(sa.String(16))  # BroadcastState
    channel: Mapped[str | None] = mapped_column(sa.String(16))  # pinned; None: each user's order
    subject: Mapped[str | None] = mapped_column(sa.String(998))
    body: Mapped[str | None] = mapped_column(sa.Text)
    template: Mapped[str | None] = mapped_column(sa.String(128))
    content_sid: Mapped[str | None] = mapped_column(sa.String(34))
    #: The template's variables as given: a value "$user.<field>" is each recipient's own field.
    variables: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    #: The audience's tags (the listed user ids and phones are `BroadcastTarget` rows).
    tags: Mapped[list[str] | None] = mapped_column(sa.JSON)
    backend_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", sa.JSON)
    send_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    #: The quiet hours each recipient's message honours in their own timezone (`HH:MM-HH:MM`, the
    #: request's `quiet_hours` or QUIET_HOURS when it was made); None: none.
    quiet_hours: Mapped[str | None] = mapped_column(sa.String(11))
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    #: How many user ids and phones the request listed, and the last one resolved so far.
    targets: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    targets_done: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    #: The tag phase's keyset position: the last contact id resolved.
    tag_cursor: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    #: Recipients resolved (each one message), and how many of them have been released as messages.
    recipients: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    released: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    #: Audience entries never messaged, by reason ({"opted_out": 3, "duplicate": 1}).
    skipped: Mapped[dict[str, int]] = mapped_column(sa.JSON, default=dict)
    #: The pump's chain: only the task carrying this token works (a sweep may start a new chain).
    pump_token: Mapped[str | None] = mapped_column(sa.String(32))
    pumped_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(sa.DateTime)


class BroadcastTarget(db.Model):
    """One user id or phone of a broadcast's audience as the request listed it (in order)."""

    __tablename__ = "broadcast_targets"

    broadcast_id: Mapped[str] = mapped_column(sa.ForeignKey("broadcasts.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[str | None] = mapped_column(sa.String(128))
    phone: Mapped[str | None] = mapped_column(sa.String(16))


class BroadcastRecipient(db.Model):
    """One person a broadcast will message, on one channel: resolved, deduplicated, not skipped.

    Unique per (broadcast, contact): an address listed twice, or a user both listed and tagged,
    is one recipient (the other entries count as skipped `duplicate`)."""

    __tablename__ = "broadcast_recipients"
    __table_args__ = (sa.UniqueConstraint("broadcast_id", "contact_id", name="uq_broadcast_recipients_contact"),)

    broadcast_id: Mapped[str] = mapped_column(sa.ForeignKey("broadcasts.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    contact_id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(sa.String(16))
    #: The template's variables with this recipient's own fields filled in (None: the broadcast's).
    variables: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    #: The approved WhatsApp template in this recipient's locale (bot/locales.py); None by email.
    content_sid: Mapped[str | None] = mapped_column(sa.String(34))
    #: The locale its copy was resolved to on its channel (bot/locales.py), for its message.
    locale: Mapped[str | None] = mapped_column(sa.String(35))


class Operator(db.Model):
    """A person who signs in to the dashboard (`flask operator create <email>`; docs/dashboard.md).

    Never a backend: the API's bearer token does not open the dashboard, and an operator's
    session does not open the API.
    """

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Lowercased, so one address is one account however it is typed at sign-in.
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)
    #: werkzeug's `generate_password_hash` (scrypt), never the password.
    password_hash: Mapped[str] = mapped_column(sa.String(256))
    #: Development mode's one-time sign-in link (`flask operator dev-link`): its SHA-256, and
    #: until when it may be used; cleared once used.
    login_link_hash: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    login_link_expires_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    last_sign_in_at: Mapped[datetime | None] = mapped_column(sa.DateTime)


class OperatorSession(db.Model):
    """One signed-in browser. The cookie holds a random token; this row holds its SHA-256, so a
    sign-in always makes a new id (no fixation) and signing out ends it on the server too."""

    __tablename__ = "operator_sessions"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)  # SHA-256 of the cookie's token
    operator_id: Mapped[int] = mapped_column(sa.ForeignKey("operators.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(sa.DateTime)

    operator: Mapped[Operator] = relationship()
