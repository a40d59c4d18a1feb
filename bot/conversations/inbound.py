"""Storing an inbound WhatsApp message from Twilio's webhook, exactly once per MessageSid."""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Mapping

from sqlalchemy.exc import IntegrityError

from bot.clock import utcnow
from bot.conversations.consent import Keywords, opt_out_source
from bot.contacts import get_or_create_contact
from bot.delivery import outbox
from bot.extensions import db
from bot.models import Message
from bot.phone import normalize_e164
from bot.vocabulary import Direction, Kind, MessageStatus
from flows.toolkit import MAX_MEDIA

log = logging.getLogger(__name__)


def media_urls(form: Mapping[str, str]) -> list[str]:
    """Every MediaUrlN of the message, in order."""
    try:
        count = int(form.get("NumMedia") or 0)
    except ValueError:
        count = 0
    return [form[f"MediaUrl{i}"] for i in range(min(max(count, 0), MAX_MEDIA)) if form.get(f"MediaUrl{i}")]


def store_inbound(form: Mapping[str, str], received_at: datetime | None = None) -> Message | None:
    """Store the message and update its contact; None when this MessageSid was already stored.

    `received_at`: when the webhook arrived, for one the worker stores later (the database was
    down, invariant 11): the 24-hour window and the contact's order run from when the user wrote.
    Raises ValueError (from the phone parser) when `From` is not a phone number.
    """
    sid = form["MessageSid"]
    # No lookup first: a repeat is rare (Twilio retrying a webhook) and the SID's unique index
    # refuses it below, so every first delivery saves a statement.
    phone = normalize_e164(form["From"])
    now = received_at or utcnow()
    contact = get_or_create_contact(phone)
    # The window runs from the latest message; a late retry of an old one must not move it back.
    if contact.last_inbound_at is None or contact.last_inbound_at < now:
        contact.last_inbound_at = now
    # Column sizes hold any real value; an absurd one is cut rather than failing the webhook.
    if form.get("ProfileName"):
        contact.profile_name = form["ProfileName"][:256]
    if form.get("WaId"):
        contact.wa_id = form["WaId"][:32]
    wants_out = opt_out_source(form, Keywords.from_config()) is not None
    message = Message(
        direction=Direction.INBOUND,
        kind=Kind.OPT_OUT_REQUEST if wants_out else Kind.INBOUND,
        contact_id=contact.id,
        body=form.get("Body", ""),
        media_urls=media_urls(form) or None,
        payload=dict(form),
        twilio_sid=sid,
        status=MessageStatus.RECEIVED,
        status_rank=MessageStatus.RECEIVED.rank,
        created_at=now,
    )
    db.session.add(message)
    outbox.defer_inbound(message)
    try:
        db.session.commit()
    except IntegrityError:  # this MessageSid is stored already (a repeat, or a race with another web process)
        db.session.rollback()
        log.info("inbound %s already stored; the repeat is ignored", sid)
        return None
    return message
