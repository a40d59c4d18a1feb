"""Users by the backend's own id: create, update, and adopt the phone-only contact a user already is.

A person is one `Contact` row (docs/ARCHITECTURE.md, "Users and channels"): a WhatsApp user who
wrote first is a contact with a phone and no `user_id`; when the backend later stores a user
with that phone, the two are the same person, so the contact is adopted (a new user) or merged
into the user (an existing one) with its messages, conversations, consent ledger and events. A
phone or an email held by another user is a conflict: one address, one person.
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from bot.clock import isoformat
from bot.contacts import lock_contact
from bot.extensions import db
from bot.models import ConsentEvent, Contact, ContactTag, Conversation, Event, Message

#: A contact's WhatsApp facts, which come with its number when a phone-only contact is merged.
WHATSAPP_FIELDS = ("consent", "last_inbound_at", "wa_id", "profile_name", "handoff_until", "handoff_reason")
#: What belongs to a number rather than to a person: reset when a user's number changes.
NUMBER_FIELDS = ("last_inbound_at", "wa_id", "profile_name")


class UserConflict(Exception):
    """A phone or email the request names belongs to another user (HTTP 409)."""


def find_user(user_id: str) -> Contact | None:
    """The contact that is this backend user, if stored."""
    return db.session.scalar(sa.select(Contact).where(Contact.user_id == user_id))


def upsert_user(user_id: str, changes: dict[str, Any]) -> tuple[Contact, bool]:
    """Store the user's fields (`changes`: named fields only; None clears one); does not commit.

    Returns the contact and whether it was created. Raises UserConflict when a phone or email
    belongs to another user. Two requests creating one new user race on the unique `user_id`: the
    loser reads the winner's row and applies its own changes on top.
    """
    changes = dict(changes)
    tags = changes.pop("tags", _KEEP)
    user = find_user(user_id)
    if changes.get("email"):
        holder = db.session.scalar(sa.select(Contact).where(Contact.email == changes["email"]))
        if holder is not None and holder is not user:
            raise UserConflict("'email' belongs to another user")
    adopted = None
    if changes.get("phone"):
        holder = db.session.scalar(sa.select(Contact).where(Contact.phone == changes["phone"]))
        if holder is not None and holder is not user:
            if holder.user_id is not None:
                raise UserConflict("'phone' belongs to another user")
            adopted = holder  # a WhatsApp user who wrote first: this user
    created = False
    if user is None and adopted is not None:
        user, adopted, created = adopted, None, True
        user.user_id = user_id
    elif user is None:
        try:
            with db.session.begin_nested():
                user = Contact(user_id=user_id)
                db.session.add(user)
            created = True
        except IntegrityError:
            user = find_user(user_id)
            if user is None:  # pragma: no cover - the violation was about another column
                raise
    if adopted is not None:
        _merge(adopted, into=user)
    elif "phone" in changes and changes["phone"] != user.phone and user.phone is not None:
        for field in NUMBER_FIELDS:  # the window and the profile were the old number's
            setattr(user, field, None)
    for field, value in changes.items():
        setattr(user, field, value)
    if tags is not _KEEP:
        _replace_tags(user, tags or [])
    return user, created


#: `tags` not named in the request: the stored ones stay.
_KEEP = object()


def _replace_tags(user: Contact, tags: list[str]) -> None:
    """The user's tags become `tags` (a row per tag: a broadcast reads its audience by tag)."""
    db.session.flush()  # a new user's id
    db.session.execute(sa.delete(ContactTag).where(ContactTag.contact_id == user.id)
                       .execution_options(synchronize_session=False))
    if tags:
        db.session.execute(sa.insert(ContactTag), [{"tag": tag, "contact_id": user.id} for tag in tags])


def user_tags(contact_id: int) -> list[str]:
    """The user's tags, in name order."""
    return list(db.session.scalars(sa.select(ContactTag.tag).where(ContactTag.contact_id == contact_id)
                                   .order_by(ContactTag.tag)))


def _merge(contact: Contact, *, into: Contact) -> None:
    """Move a phone-only contact's history into the user it turned out to be, then delete it.

    Both rows are locked first (the engine's per-contact lock, invariant 6), so no turn of
    either runs meanwhile; the number's WhatsApp consent, window and handoff come with it.
    """
    user_id, source_id = into.id, contact.id
    first, second = sorted((user_id, source_id))  # always in id order: two merges cannot deadlock
    lock_contact(first)
    db.session.execute(sa.update(Contact).where(Contact.id == second).values(updated_at=Contact.updated_at)
                       .execution_options(synchronize_session=False))
    db.session.refresh(contact)
    db.session.refresh(into)
    for model in (Message, Conversation, ConsentEvent, Event):
        db.session.execute(sa.update(model).where(model.contact_id == source_id).values(contact_id=user_id)
                           .execution_options(synchronize_session=False))
    facts = {field: getattr(contact, field) for field in WHATSAPP_FIELDS}
    phone = contact.phone
    db.session.delete(contact)
    db.session.flush()  # the number is free before the user takes it
    for field, value in facts.items():
        setattr(into, field, value)
    into.phone = phone


def user_dict(contact: Contact) -> dict[str, Any]:
    """The JSON shape of GET /users/<user_id>."""
    return {
        "user_id": contact.user_id,
        "phone": contact.phone,
        "email": contact.email,
        "name": contact.name,
        "locale": contact.locale,
        "timezone": contact.timezone,
        "channels": contact.channel_order,
        "consent": {"whatsapp": contact.consent, "email": contact.email_consent},
        "tags": user_tags(contact.id),
        "created_at": isoformat(contact.created_at),
        "updated_at": isoformat(contact.updated_at),
    }
