"""Contacts: finding and creating them safely under concurrency, and the per-contact lock."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from bot.extensions import db
from bot.models import Contact


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
