"""The data model: contacts, messages (both directions) and the append-only status events."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from bot.clock import isoformat, utcnow
from bot.extensions import db


def new_id() -> str:
    """A random public id: ids given to backends should not reveal how many rows exist."""
    return uuid.uuid4().hex


class Consent:
    """A contact's consent state."""

    UNKNOWN = "unknown"
    OPTED_IN = "opted_in"
    OPTED_OUT = "opted_out"


class Direction:
    OUTBOUND = "outbound"
    INBOUND = "inbound"


class Contact(db.Model):
    """A WhatsApp user, keyed by E.164 number."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    phone: Mapped[str] = mapped_column(sa.String(16), unique=True)  # E.164, e.g. +15551234567
    wa_id: Mapped[str | None] = mapped_column(sa.String(32))
    profile_name: Mapped[str | None] = mapped_column(sa.String(256))
    consent: Mapped[str] = mapped_column(sa.String(16), default=Consent.UNKNOWN, server_default=Consent.UNKNOWN)
    last_inbound_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)

    messages: Mapped[list["Message"]] = relationship(back_populates="contact", lazy="raise_on_sql")

    @property
    def whatsapp_address(self) -> str:
        return "whatsapp:" + self.phone


class Message(db.Model):
    """One WhatsApp message, outbound (a notification or a reply) or inbound (from the user).

    Outbound rows are the outbox: committed as `pending` before their send task is enqueued, then
    claimed (`dispatching`, with a lease until `claimed_until`) by exactly one send.
    """

    __tablename__ = "messages"
    __table_args__ = (
        sa.Index("ix_messages_outbox", "status", "next_attempt_at"),
        sa.Index("ix_messages_contact_created", "contact_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    direction: Mapped[str] = mapped_column(sa.String(8))
    contact_id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id"))
    body: Mapped[str | None] = mapped_column(sa.Text)
    template: Mapped[str | None] = mapped_column(sa.String(128))
    content_sid: Mapped[str | None] = mapped_column(sa.String(34))
    variables: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    media_urls: Mapped[list[str] | None] = mapped_column(sa.JSON)
    #: Inbound only: every form field Twilio sent (media, location, buttons, referral...).
    payload: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    twilio_sid: Mapped[str | None] = mapped_column(sa.String(34), unique=True)
    status: Mapped[str] = mapped_column(sa.String(16))
    status_rank: Mapped[int] = mapped_column(sa.SmallInteger, default=0)
    error_code: Mapped[int | None] = mapped_column(sa.Integer)
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    claimed_until: Mapped[datetime | None] = mapped_column(sa.DateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(sa.DateTime)

    contact: Mapped[Contact] = relationship(back_populates="messages")
    events: Mapped[list["StatusEvent"]] = relationship(
        back_populates="message", order_by="StatusEvent.id", lazy="raise_on_sql"
    )

    def to_dict(self, events: list["StatusEvent"] | None = None) -> dict[str, Any]:
        """The JSON shape of GET /messages/<id> (events included when given)."""
        data: dict[str, Any] = {
            "id": self.id,
            "direction": self.direction,
            "to": self.contact.phone if self.direction == Direction.OUTBOUND else None,
            "from": self.contact.phone if self.direction == Direction.INBOUND else None,
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "twilio_sid": self.twilio_sid,
            "body": self.body,
            "template": self.template,
            "variables": self.variables,
            "media_urls": self.media_urls or [],
            "attempts": self.attempts,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "sent_at": isoformat(self.sent_at),
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
