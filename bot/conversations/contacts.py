"""Finding and creating contacts by phone number, safely under concurrency."""
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
