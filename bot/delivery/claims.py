"""Claims: which outbound message may be sent now, taken atomically, with a lease.

The claim (`pending` -> `dispatching` with a lease) is a single conditional UPDATE, so however
many copies of the send task run (huey retries, the outbox sweep, a re-delivered task) only one
reaches the provider. Messages to one contact leave one at a time, in the order they were created
(invariant 9): a message whose contact has an older one unsent waits for its turn, and the send
that settles the older one hands the turn over (`release_next`). The lease is renewed while a
batch is in flight (`LeaseRenewer`), so it can be short: a dead worker's claims are re-taken
within a minute or so (docs/ARCHITECTURE.md, "The life of a message").
"""
from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import DBAPIError

from bot.clock import utcnow
from bot.contacts import lock_contact
from bot.delivery import outbox
from bot.extensions import db
from bot.models import Message
from bot.vocabulary import Channel, Direction, Kind, MessageStatus

log = logging.getLogger(__name__)

#: A claim's lease beyond the Twilio client's timeout. The lease is renewed every third of its
#: length while a batch is in flight, so it only has to outlast one renewal (and a slow commit);
#: short, a worker killed mid-batch holds its messages for half a minute, not five.
LEASE_MARGIN = timedelta(seconds=20)


#: Outbound messages not yet handed to Twilio: a later message of the same contact waits for them.
UNSENT = (MessageStatus.PENDING, MessageStatus.DISPATCHING, MessageStatus.RETRYING)


def claim_lease() -> timedelta:
    """How long a claim holds without renewal: the client's timeout and `LEASE_MARGIN`."""
    return timedelta(seconds=float(current_app.config["TWILIO_TIMEOUT"])) + LEASE_MARGIN


def not_held(of: Any, now: sa.ColumnElement) -> sa.ColumnElement[bool]:
    """SQL: `of` (Message or an alias) is not held for later, or its time has come (invariant 15:
    a held row waits in the database, `not_before`, not in the queue)."""
    return sa.or_(of.not_before.is_(None), of.not_before <= now)


def _earlier_unsent_message(of: Any = Message, now: sa.ColumnElement | None = None) -> sa.Exists:
    """SQL: an older outbound message of the same contact as `of` (Message or an alias of it)
    that Twilio has not accepted yet, and that is not held for later.

    Messages to one contact leave one at a time, in the order they were created (invariant 9):
    the claim of the next waits until Twilio took the one before it (or it failed for good). A
    message held for tomorrow does not hold today's back (invariant 15); once due it is in line.
    """
    prior = sa.orm.aliased(Message)
    return sa.exists().where(
        prior.contact_id == of.contact_id,
        prior.direction == Direction.OUTBOUND,
        prior.status.in_(UNSENT),
        prior.id != of.id,
        sa.or_(prior.created_at < of.created_at,
               sa.and_(prior.created_at == of.created_at, prior.id < of.id)),
        not_held(prior, sa.bindparam("now") if now is None else now),
    )


def _due(of: Any, now: sa.BindParameter, *, early: bool = False) -> sa.ColumnElement[bool]:
    """SQL: `of` (Message or an alias) may be claimed now, its contact's order aside — pending and
    not held, retrying and due (`early`: due or not, the task's own retry), or dispatching with an
    expired lease."""
    due = sa.true() if early else of.next_attempt_at <= now
    return sa.or_(
        sa.and_(of.status == MessageStatus.PENDING, not_held(of, now)),
        sa.and_(of.status == MessageStatus.RETRYING, due),
        sa.and_(of.status == MessageStatus.DISPATCHING, of.claimed_until < now),
    )


def _its_contacts_turn(of: Any, now: sa.BindParameter) -> sa.ColumnElement[bool]:
    """SQL: `of` is the oldest unsent message of its contact (an opt-out confirmation never waits)."""
    return sa.or_(of.kind == Kind.OPT_OUT_CONFIRMATION, ~_earlier_unsent_message(of, now))


def _claimable(of: Any, now: sa.BindParameter, *, early: bool = False) -> sa.ColumnElement[bool]:
    """SQL: `of` (Message or an alias) may be claimed now (`_due`) and is the oldest unsent
    message of its contact (`_its_contacts_turn`)."""
    return sa.and_(_due(of, now, early=early), _its_contacts_turn(of, now))


def _claiming(statement: sa.Update, now: sa.BindParameter) -> sa.Update:
    """The claim's writes, for one row or a batch: dispatching, a lease, one more attempt.

    Re-taking a row whose lease ran out makes its fate unknown: the worker that held it may have
    died after Twilio accepted it. `unsure_since` then keeps when that attempt began (the values
    on the right of SET are the row's values before the UPDATE).
    """
    expired_since = sa.func.coalesce(Message.unsure_since, Message.attempt_started_at, Message.updated_at)
    return (
        statement
        .values(status=MessageStatus.DISPATCHING, status_rank=MessageStatus.DISPATCHING.rank,
                claimed_until=sa.bindparam("lease_until"), attempts=Message.attempts + 1, updated_at=now,
                attempt_started_at=now, not_before=None,
                unsure_since=sa.case((Message.status == MessageStatus.DISPATCHING, expired_since),
                                     else_=Message.unsure_since))
        .returning(*Message.__table__.c)
        .execution_options(synchronize_session=False)
    )


@functools.cache
def _claim_statement(early: bool) -> sa.Update:
    # Built once: composing this statement costs more CPU than running it (bench/THROUGHPUT.md,
    # "Profile"); the values that change per call are bound parameters. The claims run it on the
    # session's connection (Core): through `Session.execute` the ORM makes a new statement of it
    # on every call (its bulk-UPDATE path), whose cache key is then computed anew, and returns
    # the same rows (bench/THROUGHPUT.md, "Issue 17: the batch's record").
    now = sa.bindparam("now")
    return _claiming(sa.update(Message).where(Message.id == sa.bindparam("message_id"),
                                              _claimable(Message, now, early=early)), now)


def claim(message_id: str, *, early: bool = False) -> sa.Row | None:
    """Atomically take a message for sending: pending, retrying once its next attempt is due
    (`early`: the task's own retry, whose delay already is the backoff), or dispatching with an
    expired lease (its worker died) — and none of its contact's older messages still unsent
    (an opt-out confirmation excepted: it is the one message that must not wait).

    Returns the claimed row as it is after the claim (None if not claimed): the UPDATE returns it,
    so the send reads nothing more of the message.
    """
    now = utcnow()
    claimed = db.session.connection().execute(_claim_statement(early), {
        "message_id": message_id, "now": now, "lease_until": now + claim_lease()}).first()
    db.session.commit()
    return claimed


@functools.cache
def _claim_many_statement() -> sa.Update:
    now = sa.bindparam("now")
    return _claiming(sa.update(Message).where(Message.id.in_(sa.bindparam("ids", expanding=True)),
                                              _claimable(Message, now)), now)


def claim_many(message_ids: list[str]) -> list[sa.Row]:
    """`claim` for several messages in one statement (replies handed over by their turns): those
    that may be claimed now are, each with its lease; the others are left as they are."""
    now = utcnow()
    rows = db.session.connection().execute(_claim_many_statement(), {
        "ids": message_ids, "now": now, "lease_until": now + claim_lease()}).all()
    db.session.commit()
    return rows


#: How many due messages a batch's claim looks at for each place it fills: the contact-order
#: check runs on these only, never on the whole backlog.
SHORTLIST_FACTOR = 2


@functools.cache
def _claim_along_statement(postgresql: bool) -> sa.Update:
    # The other due messages, replies first, then those of the claimed message's channel, then
    # oldest first: a WhatsApp send's batch is WhatsApp first, its spare places go to email (and
    # the other way round), so a backlog on one channel never holds the other back. On
    # PostgreSQL rows another consumer is claiming right now are skipped (SKIP LOCKED), not
    # waited for. SQLite has one writer at a time, and no FOR UPDATE. A broadcast's messages ride
    # only in a broadcast's batch, and a broadcast's batch takes nothing else: a reply's or a
    # /notify's batch never waits on the bulk share of the rate, and a reply is never sent from
    # the bulk lane or the bulk process, which run at a lower priority (invariant 16;
    # docs/delivery.md, "Broadcasts").
    #
    # In two steps: a shortlist of the first due messages in that order (SHORTLIST_FACTOR per
    # place, locked), then those of them whose contact has no older unsent message. The
    # contact-order check is a probe per message it runs on; run on every due message of a
    # backlog, as it was, it cost what the planner's choice of index made it, and beside a burst
    # the planner (whose statistics saw almost no unsent rows) probed the unsent rows by channel
    # and read the whole backlog for each: 0.9 s of PostgreSQL's CPU per claim beside 2,000 pending
    # (bench/THROUGHPUT.md, "The claim beside a backlog"). A message left out because its
    # contact's older one is unsent would not have been claimed either; one left out of the
    # shortlist is claimed by its own task or a later batch.
    candidate = sa.orm.aliased(Message, name="candidate")
    now = sa.bindparam("now")
    of_broadcast = sa.bindparam("of_broadcast", type_=sa.Boolean)
    conversation_first = sa.case((candidate.kind.in_(sorted(outbox.CONVERSATION_KINDS)), 0), else_=1)
    own_channel_first = sa.case((candidate.channel == sa.bindparam("own_channel"), 0), else_=1)
    shortlist = (
        sa.select(candidate.id, candidate.contact_id, candidate.kind, candidate.created_at,
                  conversation_first.label("conversation_first"), own_channel_first.label("own_channel_first"))
        .where(candidate.direction == Direction.OUTBOUND, candidate.id != sa.bindparam("exclude_id"),
               sa.or_(sa.and_(of_broadcast, candidate.kind == Kind.BROADCAST.value),
                      sa.and_(sa.not_(of_broadcast), candidate.kind != Kind.BROADCAST.value)),
               _due(candidate, now))
        .order_by(conversation_first, own_channel_first, candidate.created_at)
        .limit(sa.bindparam("shortlist"))
        .with_for_update(skip_locked=True)
        .subquery("shortlist")
    )
    listed = shortlist.c
    ids = (
        sa.select(listed.id)
        .where(_its_contacts_turn(listed, now))
        .order_by(listed.conversation_first, listed.own_channel_first, listed.created_at)
        .limit(sa.bindparam("limit"))
    )
    if postgresql:
        # The ids as an array made once (an InitPlan), then fetched by primary key: as a semi-join
        # the planner, expecting one unsent row, scanned every unsent row against the list.
        chosen = Message.id == sa.func.any(sa.func.array(ids.scalar_subquery()))
    else:
        chosen = Message.id.in_(ids)
    return _claiming(sa.update(Message).where(chosen, Message.status.in_(UNSENT)), now)


def claim_along(exclude_id: str, limit: int, channel: str = Channel.WHATSAPP, *,
                of_broadcast: bool = False) -> list[sa.Row]:
    """Claim up to `limit` other due messages, each the oldest unsent of its contact, in one
    statement: the send that claimed `exclude_id` (on `channel`) sends them at the same time;
    messages of its own channel first. `of_broadcast` (the claimed message is a broadcast's):
    only a broadcast's messages; otherwise none of them."""
    if limit <= 0:
        return []
    now = utcnow()
    connection = db.session.connection()
    rows = connection.execute(_claim_along_statement(connection.dialect.name == "postgresql"), {
        "exclude_id": exclude_id, "now": now, "lease_until": now + claim_lease(), "limit": limit,
        "shortlist": limit * SHORTLIST_FACTOR, "own_channel": str(channel), "of_broadcast": of_broadcast}).all()
    db.session.commit()
    return rows


def wait_for_turn(message_id: str) -> bool:
    """Mark a pending message as waiting for an older one to its contact; False if none is older.

    Marked waiting (`next_attempt_at` set, which also lets the sweep pick it up should the hand-
    over be lost), its task ends; the older message's send hands over to it (`release_next`).
    Both take the contact's lock, so a hand-over cannot slip between the check and the mark.
    """
    contact_id = db.session.scalar(sa.select(Message.contact_id).where(Message.id == message_id))
    if contact_id is None:
        return False
    lock_contact(contact_id)
    now = utcnow()
    marked = db.session.execute(
        sa.update(Message)
        .where(Message.id == message_id, Message.status == MessageStatus.PENDING, _earlier_unsent_message(),
               not_held(Message, sa.bindparam("now")))
        .values(next_attempt_at=now + outbox.REENQUEUE_AFTER)
        .execution_options(synchronize_session=False), {"now": now}
    ).rowcount
    db.session.commit()
    return bool(marked)


def release_next(message_id: str, contact_id: int | None = None) -> None:
    """Hand the contact's turn to their next message, if it waits (this one was accepted or failed)."""
    if contact_id is None:
        contact_id = db.session.scalar(sa.select(Message.contact_id).where(Message.id == message_id))
    # Most sends have nobody behind them, and then the lock is not needed: a message created after
    # this one was accepted (or failed) finds nothing older unsent and is claimed at once.
    if _next_pending(contact_id, message_id) is None:
        return
    lock_contact(contact_id)
    waiting = _next_pending(contact_id, message_id)
    if waiting is not None and waiting.next_attempt_at is not None:
        outbox.defer_send(waiting.id, waiting.kind)  # its own task found it waiting (or it is queued again)
    db.session.commit()


@functools.cache
def _next_pending_statement() -> sa.Select:
    return (sa.select(Message.id, Message.kind, Message.next_attempt_at)
            .where(Message.contact_id == sa.bindparam("contact_id"), Message.direction == Direction.OUTBOUND,
                   Message.status == MessageStatus.PENDING, Message.id != sa.bindparam("after_id"),
                   not_held(Message, sa.bindparam("now")))
            .order_by(Message.created_at, Message.id).limit(1))


def _next_pending(contact_id: int, after_id: str) -> sa.Row | None:
    """The contact's oldest pending outbound message other than `after_id` and not held for
    later (id, kind, next_attempt_at)."""
    return db.session.execute(_next_pending_statement(),
                              {"contact_id": contact_id, "after_id": after_id, "now": utcnow()}).first()


class LeaseRenewer:
    """Pushes the claims' lease forward while a batch waits on Twilio (called by in_flight)."""

    def __init__(self, message_ids: list[str], lease: timedelta) -> None:
        self.message_ids, self.lease = message_ids, lease
        self.every = lease.total_seconds() / 3

    def __call__(self) -> None:
        now = utcnow()
        try:
            db.session.execute(
                sa.update(Message)
                .where(Message.id.in_(self.message_ids), Message.status == MessageStatus.DISPATCHING)
                .values(claimed_until=now + self.lease)
                .execution_options(synchronize_session=False))
            db.session.commit()
        except DBAPIError:
            # The lease may run out and another worker re-take a row; it will look Twilio up first.
            db.session.rollback()
            log.warning("could not renew the lease of %d messages in flight", len(self.message_ids))
        finally:
            db.session.close()


def lease_renewer(message_ids: list[str]) -> LeaseRenewer:
    return LeaseRenewer(message_ids, claim_lease())
