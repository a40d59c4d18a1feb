"""Storing an inbound WhatsApp message from Twilio's webhook, exactly once per MessageSid.

The hot path of the webhook (issue 17): no ORM unit of work, statements built once, as few round
trips as the database allows — one on PostgreSQL (the contact's upsert is a CTE of the message's
INSERT), two on SQLite (which has no data-modifying CTE) — and one commit
(docs/ARCHITECTURE.md, invariants 2 and 11; bench/THROUGHPUT.md, "The web's hot path").
"""
from __future__ import annotations

import functools
import logging
from datetime import datetime
from typing import Any, Mapping

import sqlalchemy as sa

from bot.clock import utcnow
from bot.conversations.consent import Keywords, opt_out_source
from bot.contacts import contact_upsert_statement, dialect_insert
from bot.delivery import outbox
from bot.extensions import db
from bot.models import Message, new_id
from bot.phone import normalize_e164
from bot.vocabulary import Channel, Direction, Kind, MessageStatus
from flows.toolkit import MAX_MEDIA

log = logging.getLogger(__name__)

#: Column sizes hold any real value; an absurd one is cut rather than failing the webhook.
MAX_PROFILE_NAME, MAX_WA_ID = 256, 32


def media_urls(form: Mapping[str, str]) -> list[str]:
    """Every MediaUrlN of the message, in order."""
    try:
        count = int(form.get("NumMedia") or 0)
    except ValueError:
        count = 0
    return [form[f"MediaUrl{i}"] for i in range(min(max(count, 0), MAX_MEDIA)) if form.get(f"MediaUrl{i}")]


@functools.cache
def _insert_message_statement(dialect: str) -> sa.Insert:
    # Built once per dialect: composing it costs more CPU than running it (bench/THROUGHPUT.md).
    # ON CONFLICT DO NOTHING on the SID: a repeat (Twilio retrying, or another web process that
    # took the same webhook) inserts nothing and returns no row.
    messages = Message.__table__
    values: dict[str, Any] = {
        "id": sa.bindparam("message_id"), "direction": Direction.INBOUND.value, "channel": Channel.WHATSAPP.value,
        "kind": sa.bindparam("kind"), "body": sa.bindparam("body"),
        "media_urls": sa.bindparam("media_urls", type_=messages.c.media_urls.type),
        "payload": sa.bindparam("payload", type_=messages.c.payload.type), "twilio_sid": sa.bindparam("sid"),
        "status": MessageStatus.RECEIVED.value, "status_rank": MessageStatus.RECEIVED.rank, "attempts": 0,
        "created_at": sa.bindparam("now"), "updated_at": sa.bindparam("now"),
    }
    if dialect == "postgresql":
        # One statement: the contact's upsert runs as a CTE and hands the message its id.
        contact = contact_upsert_statement(dialect).cte("contact")
        values["contact_id"] = sa.select(contact.c.id).scalar_subquery()
        statement = dialect_insert(dialect, messages).values(values).add_cte(contact)
    else:
        values["contact_id"] = sa.bindparam("contact_id")
        statement = dialect_insert(dialect, messages).values(values)
    return statement.on_conflict_do_nothing(index_elements=["twilio_sid"]).returning(messages.c.id)


def store_inbound(form: Mapping[str, str], received_at: datetime | None = None) -> str | None:
    """Store the message and update its contact; its id, or None when this MessageSid was
    already stored (nothing changes then: the contact's update is rolled back with it).

    `received_at`: when the webhook arrived, for one the worker stores later (the database was
    down, invariant 11): the 24-hour window and the contact's order run from when the user wrote.
    Raises ValueError (from the phone parser) when `From` is not a phone number.
    """
    sid = form["MessageSid"]
    phone = normalize_e164(form["From"])  # before any query: a bad From is a 400 even with the database down
    now = received_at or utcnow()
    wants_out = opt_out_source(form, Keywords.from_config()) is not None
    params: dict[str, Any] = {
        "phone": phone, "now": now, "message_id": new_id(), "sid": sid,
        # Empty fields change nothing on the contact (the upsert keeps what it has).
        "profile_name": (form.get("ProfileName") or "")[:MAX_PROFILE_NAME] or None,
        "wa_id": (form.get("WaId") or "")[:MAX_WA_ID] or None,
        "kind": Kind.OPT_OUT_REQUEST.value if wants_out else Kind.INBOUND.value,
        "body": form.get("Body", ""), "media_urls": media_urls(form) or None, "payload": dict(form),
    }
    dialect = db.session.get_bind().dialect.name
    if dialect != "postgresql":
        params["contact_id"] = db.session.execute(contact_upsert_statement(dialect), params).scalar_one()
    message_id = db.session.execute(_insert_message_statement(dialect), params).scalar()
    if message_id is None:  # this MessageSid is stored already (a repeat, or a race with another web process)
        db.session.rollback()
        log.info("inbound %s already stored; the repeat is ignored", sid)
        return None
    outbox.defer_inbound(message_id)  # enqueued once committed (invariant 1)
    db.session.commit()
    return message_id
