"""Contacts: finding and creating them safely under concurrency, the per-contact lock, and
whether a STOP waits for the engine.

Below both the conversations and the delivery packages (each imports it, neither the other):
the send path takes the contact's lock and folds `opt_out_waiting_clause` into its read of the
recipients without knowing the conversation engine (docs/ARCHITECTURE.md, "The channel seam").
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from bot.extensions import db
from bot.models import Contact, Message
from bot.vocabulary import Direction, Kind, MessageStatus


def get_or_create_contact(phone: str) -> Contact:
    """The contact for an E.164 number, created if new.

    Two requests for a new number can race; the unique index decides, and the loser reads the
    winner's row. A savepoint keeps the caller's transaction intact.
    """
    contact = db.session.scalar(sa.select(Contact).where(Contact.phone == phone))
    if contact is not None:
        return contact
    try:
        with db.session.begin_nested():
            contact = Contact(phone=phone)
            db.session.add(contact)
    except IntegrityError:
        contact = db.session.scalar(sa.select(Contact).where(Contact.phone == phone))
        if contact is None:  # pragma: no cover - the unique violation was about something else
            raise
    return contact


def lock_contact(contact_id: int) -> None:
    """Take the per-contact lock for the rest of the current transaction (invariant 6).

    The lock is an UPDATE of the contact's row and must be the transaction's first statement (a
    row lock on PostgreSQL, the write lock on SQLite), so whatever came before is committed first.
    """
    db.session.commit()
    db.session.execute(
        sa.update(Contact).where(Contact.id == contact_id).values(updated_at=Contact.updated_at)
        .execution_options(synchronize_session=False)
    )


def opt_out_waiting(contact_id: int) -> bool:
    """Whether the contact has sent an opt-out that the worker has not handled yet.

    The webhook stores STOP at once (marked as an opt-out request, by `opt_out_source`) but the
    engine applies it a moment later; until then the send path and /notify treat the contact as
    opted out, so nothing slips through the gap.
    """
    return bool(db.session.scalar(sa.select(opt_out_waiting_clause(contact_id))))


def opt_out_waiting_clause(contact_id: Any) -> sa.Exists:
    """SQL: `opt_out_waiting` for a contact id or column, to fold into a query that reads the
    contact anyway (the send path reads both in one statement)."""
    return sa.exists().where(
        Message.contact_id == contact_id, Message.direction == Direction.INBOUND,
        Message.status == MessageStatus.RECEIVED, Message.kind == Kind.OPT_OUT_REQUEST)
