"""Contacts: finding and creating them safely under concurrency, the per-contact lock, and
whether a STOP waits for the engine.

Below both the conversations and the delivery packages (each imports it, neither the other):
the send path takes the contact's lock and folds `opt_out_waiting_clause` into its read of the
recipients without knowing the conversation engine (docs/ARCHITECTURE.md, "The channel seam").
"""
from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from bot.extensions import db
from bot.models import Contact, Message
from bot.vocabulary import Consent, Direction, Kind, MessageStatus


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


@functools.cache
def _lock_contact_of_statement(direction: str) -> sa.Update:
    # On the tables, not the mapped classes: run on the session's connection, it skips the ORM's
    # bulk-UPDATE path (its compile state, the session sync), which cost more than the turn's
    # own writes (bench/THROUGHPUT.md, "The worker's hot path"). It changes no loaded object.
    contacts, messages = Contact.__table__, Message.__table__
    owner = sa.select(messages.c.contact_id).where(messages.c.id == sa.bindparam("message_id"),
                                                   messages.c.direction == direction).scalar_subquery()
    return (sa.update(contacts).where(contacts.c.id == owner).values(updated_at=contacts.c.updated_at)
            .returning(contacts.c.id))


def lock_contact_of(message_id: str, direction: str) -> int | None:
    """`lock_contact` for the contact of message `message_id` (of that direction), found and
    locked in one statement; returns the contact's id, None (nothing locked) when there is no
    such message."""
    db.session.commit()
    return db.session.connection().execute(_lock_contact_of_statement(str(direction)),
                                           {"message_id": message_id}).scalar()


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


def dialect_insert(dialect: str, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with the dialect's ON CONFLICT clauses (both have them; SQLite since 3.24)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


@functools.cache
def contact_upsert_statement(dialect: str) -> sa.Insert:
    """The contact who just wrote, created or updated in one statement, returning its id.

    Parameters: `phone`, `now` (when they wrote), `profile_name` and `wa_id` (None keeps the
    stored value). The window runs from the latest message: a late retry of an old one (or a
    webhook the worker stores after an outage) never moves `last_inbound_at` back. Two webhooks
    of one new number cannot both create it: the unique phone decides, and the second updates.
    Built once per dialect (bench/THROUGHPUT.md, "The web's hot path").
    """
    contacts = Contact.__table__
    now = sa.bindparam("now", type_=contacts.c.last_inbound_at.type)
    insert = dialect_insert(dialect, contacts).values(
        phone=sa.bindparam("phone"), wa_id=sa.bindparam("wa_id"), profile_name=sa.bindparam("profile_name"),
        last_inbound_at=now, consent=Consent.UNKNOWN.value, email_consent=Consent.UNKNOWN.value,
        created_at=now, updated_at=now)
    return insert.on_conflict_do_update(
        index_elements=["phone"],
        set_={
            "last_inbound_at": sa.case(
                (sa.or_(contacts.c.last_inbound_at.is_(None), contacts.c.last_inbound_at < insert.excluded.last_inbound_at),
                 insert.excluded.last_inbound_at),
                else_=contacts.c.last_inbound_at),
            "profile_name": sa.func.coalesce(insert.excluded.profile_name, contacts.c.profile_name),
            "wa_id": sa.func.coalesce(insert.excluded.wa_id, contacts.c.wa_id),
            "updated_at": insert.excluded.updated_at,
        },
    ).returning(contacts.c.id)


#: What /notify needs to know of a contact (bot.http.notify): who it is and whether it may be sent to.
FACTS = ("id", "user_id", "consent", "last_inbound_at")


def _new_contact_columns(value) -> dict:
    contacts = Contact.__table__
    now = value("now", contacts.c.created_at)
    return {"phone": value("phone", contacts.c.phone), "consent": sa.literal(Consent.UNKNOWN.value),
            "email_consent": sa.literal(Consent.UNKNOWN.value), "created_at": now, "updated_at": now}


@functools.cache
def contact_by_phone_cte() -> sa.CTE:
    """PostgreSQL: the contact of `phone` as a CTE named "contact" (columns `FACTS`), inserted
    if new, for one statement that goes on to write its message (bot.http.notify).

    Found first, inserted only when not found: an existing contact's row is not rewritten (an
    upsert's DO UPDATE would leave a dead row version behind on every notification). A number a
    concurrent request inserted after this statement's snapshot is neither found nor inserted:
    the CTE is empty, and the caller runs the statement again."""
    contacts = Contact.__table__
    found = sa.select(*(contacts.c[name] for name in FACTS)).where(contacts.c.phone == sa.bindparam("phone")).cte("found")
    columns = _new_contact_columns(lambda name, column: sa.cast(sa.bindparam(name, type_=column.type), column.type))
    made = (postgresql.insert(contacts)
            .from_select(list(columns), sa.select(*columns.values()).where(~sa.exists(sa.select(found.c.id))))
            .on_conflict_do_nothing(index_elements=["phone"])
            .returning(*(contacts.c[name] for name in FACTS)).cte("made"))
    return sa.union_all(sa.select(*(found.c[name] for name in FACTS)),
                        sa.select(*(made.c[name] for name in FACTS))).cte("contact")


@functools.cache
def new_contact_statement(dialect: str) -> sa.Insert:
    """A contact for `phone` (parameters `phone`, `now`), unless the number has one; returns
    `FACTS` of the new row, nothing when it existed."""
    contacts = Contact.__table__
    columns = _new_contact_columns(lambda name, column: sa.bindparam(name, type_=column.type))
    return (dialect_insert(dialect, contacts).values(columns).on_conflict_do_nothing(index_elements=["phone"])
            .returning(*(contacts.c[name] for name in FACTS)))
