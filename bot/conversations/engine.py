"""The conversation engine: what the worker's tasks call to handle messages and conversations.

Runs in the worker only. Messages of one contact are handled one at a time and in arrival order
(invariant 6): every turn starts by locking the contact's row and then takes the contact's
*oldest* unprocessed message, whichever task got there first. Different contacts lock different
rows and run in parallel. A turn runs the message through the stages (`bot.conversations.stages`)
and commits consent, conversation and replies together; the replies' sends are enqueued by the
outbox once that commit succeeds.

A turn reads what it needs in one statement after the lock (the message, its contact, the open
conversation) and writes nothing while the stages run (the session's autoflush is off): what
they add and change is written together at the turn's end (`writes.write_turn`), and a failing
flow's writes, never sent, are dropped from the session instead of rolled back to a savepoint
(docs/ARCHITECTURE.md, "Inbound").
"""
from __future__ import annotations

import functools
import logging
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from bot.clock import utcnow
from bot.conversations.consent import Keywords, change_consent, opt_out_source
from bot.conversations.stages import Turn, obey_opt_out, run_stages
from bot.contacts import lock_contact, lock_contact_of
from bot.delivery import outbox
from bot.conversations.store import (answer_consent_questions, apply_step, end_conversation,
                                     end_open_conversations, open_conversation, remember_open_conversation,
                                     send_replies, start_flow)
from bot.conversations.scheduled import hold_first_messages, is_held
from bot.conversations.writes import write_turn
from bot.conversations.handoff import HANDED_OVER, HandoffBy, end_handoff, expired_handoffs, in_handoff
from bot.delivery import events
from bot.extensions import db
from bot.models import Contact, Conversation, Message
from bot.vocabulary import Consent, ConversationStatus, Direction, Kind, MessageStatus, StartedBy
from flows import registry
from flows.toolkit import Reply

log = logging.getLogger(__name__)

#: Turns of one inbound message (or starts of one conversation) that may fail on a database error
#: retrying cannot fix before it is given up on (`failed`, with the reason), so the contact's next
#: message goes on (invariant 6). Three fit inside one task's huey retries.
MAX_TURN_ATTEMPTS = 3
#: After a failed turn, the sweep leaves the row alone this long: the task's own retries come first.
TURN_HOLD_OFF = outbox.REENQUEUE_AFTER


def is_transient(exc: DBAPIError) -> bool:
    """Whether retrying can fix this database error: a lost connection, a deadlock or a
    serialization failure, a lock timeout, "database is locked". A `DataError`,
    `IntegrityError` or `ProgrammingError` comes back on every retry of the same turn."""
    return isinstance(exc, (OperationalError, InterfaceError)) or bool(exc.connection_invalidated)


@functools.cache
def _turn_statement() -> sa.Select:
    """After the contact's lock: the contact's oldest unprocessed inbound message, the contact and
    its active conversation (the latest started, if any), fresh, in one read; nothing when the
    task's own message no longer waits (another task's turn took it). Built once
    (bench/THROUGHPUT.md, "The worker's hot path")."""
    own = sa.orm.aliased(Message)
    own_waits = sa.exists().where(own.id == sa.bindparam("message_id"), own.status == MessageStatus.RECEIVED)
    latest_active = (sa.select(Conversation.id)
                     .where(Conversation.contact_id == sa.bindparam("contact_id"),
                            Conversation.status == ConversationStatus.ACTIVE)
                     .order_by(Conversation.started_at.desc()).limit(1).scalar_subquery())
    return (sa.select(Message, Contact, Conversation).join(Contact, Contact.id == Message.contact_id)
            .outerjoin(Conversation, Conversation.id == latest_active)
            .where(Message.contact_id == sa.bindparam("contact_id"), Message.direction == Direction.INBOUND,
                   Message.status == MessageStatus.RECEIVED, own_waits)
            .order_by(Message.created_at, Message.id).limit(1)
            .execution_options(populate_existing=True))


def process_inbound(message_id: str) -> None:
    """Handle the contact's unprocessed messages, oldest first, until `message_id` is done."""
    contact_id = lock_contact_of(message_id, Direction.INBOUND)
    while contact_id is not None:
        found = db.session.execute(_turn_statement(), {"contact_id": contact_id, "message_id": message_id}).first()
        if found is None:
            db.session.commit()
            return
        message, contact, conversation = found
        remember_open_conversation(contact_id, conversation)
        oldest_id = message.id
        try:
            _handle_safely(message, contact)
            # Consent, conversation and replies land together, before any send; the replies are
            # handed to the sender once this commits (outbox.hand_over_sends).
            db.session.commit()
        except DBAPIError as exc:
            db.session.rollback()  # the turn's transaction is broken: nothing more can go in it
            if is_transient(exc) or not _count_failed_turn(oldest_id, contact_id, exc):
                raise  # still received: the task's retry (or the sweep) runs the turn again
            # Given up on: the loop goes on with the contact's next message.
        else:
            if oldest_id == message_id:
                return  # its own message is done: no second look
        lock_contact(contact_id)


def _count_failed_turn(message_id: str, contact_id: int, exc: DBAPIError) -> bool:
    """Count a turn that failed on a database error retrying cannot fix, in a fresh transaction
    (under the contact's lock); at MAX_TURN_ATTEMPTS the message is `failed` with the reason.
    True when it was given up on (or is no longer waiting), False when it should be retried."""
    lock_contact(contact_id)
    message = db.session.get(Message, message_id, populate_existing=True)
    if message is None or message.status != MessageStatus.RECEIVED:
        db.session.commit()
        return True
    message.attempts = (message.attempts or 0) + 1
    reason = _db_error_reason(exc)
    if message.attempts < MAX_TURN_ATTEMPTS:
        message.error_message = f"turn {message.attempts} failed: {reason}"
        message.next_attempt_at = utcnow() + TURN_HOLD_OFF
        db.session.commit()
        log.warning("turn of inbound message %s failed (%d of %d): %s", message_id, message.attempts,
                    MAX_TURN_ATTEMPTS, type(exc).__name__)
        return False
    log.error("inbound message %s given up after %d failed turns: %s", message_id, message.attempts,
              type(exc).__name__)
    if message.kind == Kind.OPT_OUT_REQUEST and not _obey_given_up_opt_out(message):
        # Not even the consent change goes in: the row stays waiting (it still holds sends
        # back) rather than lose the STOP, and the task's retry or the sweep tries again.
        message.next_attempt_at = utcnow() + TURN_HOLD_OFF
        db.session.commit()
        return False
    message.status, message.status_rank = MessageStatus.FAILED, MessageStatus.FAILED.rank
    message.error_message = f"gave up after {message.attempts} failed turns: {reason}"
    message.next_attempt_at = None
    db.session.commit()
    return True


def _obey_given_up_opt_out(message: Message) -> bool:
    """A STOP is obeyed even when its turn could not run (invariant 4): consent first, no reply.
    Once the row is `failed` it no longer holds sends back as a waiting opt-out, so this must land
    first; False (logged) when it could not."""
    contact = db.session.get(Contact, message.contact_id, populate_existing=True)
    try:
        with db.session.begin_nested():
            obey_opt_out(contact, message, opt_out_source(message.payload or {}, Keywords.from_config()) or "keyword")
        return True
    except DBAPIError:
        log.exception("could not apply the opt-out of inbound message %s", message.id)
        return False


def _db_error_reason(exc: DBAPIError) -> str:
    """The error's class and first line, short: the database's own words, never the parameters."""
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None and str(exc.orig).strip() else ""
    return f"{type(exc).__name__}: {detail}"[:300] if detail else type(exc).__name__


def handle_message(contact: Contact, message: Message) -> list[Message]:
    """One turn through the stages; returns the replies it queued."""
    return run_stages(Turn.of(contact, message))


def _handle_safely(message: Message, contact: Contact | None = None) -> list[Message]:
    """Handle one message; a failing flow costs an apology, never the message or the contact.

    `contact`: the message's contact, read fresh under its lock (else it is read here)."""
    if contact is None:
        contact = db.session.get(Contact, message.contact_id, populate_existing=True)
    outbox.hand_over_sends()
    # No flush while the stages run: the turn's writes go out together (write_turn), and a
    # failing flow's are still only in the session, where _forget_unflushed drops them.
    with db.session.no_autoflush:
        try:
            outgoing = handle_message(contact, message)
            message.status = MessageStatus.PROCESSED
            _report_received(contact, message, outgoing)
        except DBAPIError:
            # The database, not the flow: process_inbound rolls back and decides (is_transient)
            # whether the turn is retried as it is or counted towards giving the message up.
            raise
        except Exception as exc:
            log.exception("flow failed on inbound message %s", message.id)
            _forget_unflushed()
            outgoing = _apologise(contact, message, exc)
    # Outside the flow's try: a database error here is the database's, never an apology.
    write_turn()
    return outgoing


def _forget_unflushed() -> None:
    """Drop what the failed flow wrote: its new rows leave the session (their deferred sends and
    events with them: the outbox skips rows that never committed) and every changed row is
    expired, so it reads again as the database has it. Nothing was flushed since the turn's read
    (autoflush is off), so this is what rolling back to a savepoint taken there would leave."""
    session = db.session()
    for row in list(session.new):
        session.expunge(row)
    for row in list(session.dirty):
        session.expire(row)


def _apologise(contact: Contact, message: Message, exc: Exception) -> list[Message]:
    """The failed flow's turn: the message is processed all the same, with an apology (silence
    after a STOP), and an open conversation ends so the next message starts fresh."""
    db.session.refresh(contact)
    message.status = MessageStatus.PROCESSED
    message.error_message = f"handler error: {type(exc).__name__}"
    if message.kind == Kind.OPT_OUT_REQUEST:
        # Whatever broke (the confirmation's copy, say), a STOP is obeyed: consent first,
        # and then silence rather than an apology.
        obey_opt_out(contact, message, opt_out_source(message.payload or {}, Keywords.from_config()) or "keyword")
        _report_received(contact, message, [])
        return []
    conversation = open_conversation(contact.id)
    if conversation is not None:
        # End it, so the contact's next message starts fresh instead of failing again.
        end_conversation(conversation, ConversationStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:500])
    apology = send_replies(contact, [Reply("common/error")])
    _report_received(contact, message, apology)
    return apology


def _report_received(contact: Contact, message: Message, outgoing: list[Message]) -> None:
    """message.received, in the turn's transaction: where the message went and whether the bot
    answered it (during a handoff: unanswered, for an agent's inbox)."""
    conversation_id = next((row.conversation_id for row in outgoing if row.conversation_id), None)
    conversation = _conversation(conversation_id) if conversation_id else open_conversation(contact.id)
    events.message_received(message, contact, conversation=conversation,
                            answered=any(row.status != MessageStatus.FAILED for row in outgoing),
                            handoff=in_handoff(contact))


def _conversation(conversation_id: str) -> Conversation | None:
    """A conversation by id, from the session when the turn started it (not flushed yet)."""
    started = next((row for row in db.session.new if isinstance(row, Conversation) and row.id == conversation_id), None)
    return started if started is not None else db.session.get(Conversation, conversation_id)


def set_consent_from_api(contact: Contact, consent: Consent, note: str | None) -> None:
    """Consent the backend collected elsewhere (PUT /contacts/<phone>/consent); does not commit.

    Takes the contact's lock, so a conversation the worker is opening right now is either
    committed before this (and ended here) or sees the new consent after it. Opting out ends
    every open conversation; opting in answers any flow that was asking for consent.
    """
    lock_contact(contact.id)
    db.session.refresh(contact)
    if consent == Consent.OPTED_OUT:
        end_open_conversations(contact.id, ConversationStatus.CANCELLED, error="contact opted out (API)")
    else:
        answer_consent_questions(contact.id, registry())
    change_consent(contact, consent, source="api", words=note)


def start_conversation(conversation_id: str) -> None:
    """Start a conversation the backend asked for (POST /notify with "flow")."""
    conversation = db.session.get(Conversation, conversation_id)
    if conversation is None:
        return
    lock_contact(conversation.contact_id)
    db.session.refresh(conversation)
    if conversation.status != ConversationStatus.STARTING or is_held(conversation):
        db.session.commit()  # started, ended, or held for later: the release starts it then
        return
    contact_id = conversation.contact_id
    try:
        _start(conversation)
        db.session.commit()
    except DBAPIError as exc:
        db.session.rollback()  # the start's transaction is broken: count it in a fresh one
        if is_transient(exc) or not _count_failed_start(conversation_id, contact_id, exc):
            raise  # still STARTING: the task's retry or the sweep starts it again


def _start(conversation: Conversation) -> None:
    """Run the flow's start for a `starting` conversation (the contact is locked); no commit."""
    contact = db.session.get(Contact, conversation.contact_id)
    db.session.refresh(contact)
    flow = registry().get(conversation.flow)
    if contact.consent == Consent.OPTED_OUT:
        end_conversation(conversation, ConversationStatus.CANCELLED, error="contact opted out")
    elif in_handoff(contact):
        # /notify checked the handoff without the contact's lock: one committed between that check
        # and the conversation's commit found nothing to cancel. Checked again here, under the
        # lock, it ends the conversation as the handoff would have (docs/ARCHITECTURE.md, "Human
        # handoff"): the bot never writes to a contact a person is answering.
        end_conversation(conversation, ConversationStatus.CANCELLED, error=HANDED_OVER)
    elif flow is None:
        end_conversation(conversation, ConversationStatus.FAILED, error=f"flow {conversation.flow!r} no longer exists")
    else:
        try:
            with db.session.begin_nested():
                first = start_flow(contact, flow, conversation.variables or {}, started_by=StartedBy.BACKEND,
                                   conversation=conversation)
                hold_first_messages(conversation, first)
        except DBAPIError:
            raise  # the database, not the flow: start_conversation decides
        except Exception as exc:
            log.exception("starting conversation %s failed", conversation.id)
            end_conversation(conversation, ConversationStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:500])


def _count_failed_start(conversation_id: str, contact_id: int, exc: DBAPIError) -> bool:
    """`_count_failed_turn` for a backend-started conversation: at MAX_TURN_ATTEMPTS it is ended
    `failed` with the reason. True when given up on (or no longer starting)."""
    lock_contact(contact_id)
    conversation = db.session.get(Conversation, conversation_id, populate_existing=True)
    if conversation is None or conversation.status != ConversationStatus.STARTING:
        db.session.commit()
        return True
    conversation.attempts = (conversation.attempts or 0) + 1
    reason = _db_error_reason(exc)
    if conversation.attempts < MAX_TURN_ATTEMPTS:
        conversation.next_attempt_at = utcnow() + TURN_HOLD_OFF
        db.session.commit()
        log.warning("start of conversation %s failed (%d of %d): %s", conversation_id, conversation.attempts,
                    MAX_TURN_ATTEMPTS, type(exc).__name__)
        return False
    log.error("conversation %s given up after %d failed starts: %s", conversation_id, conversation.attempts,
              type(exc).__name__)
    conversation.next_attempt_at = None
    end_conversation(conversation, ConversationStatus.FAILED,
                     error=f"gave up after {conversation.attempts} failed starts: {reason}")
    db.session.commit()
    return True


def expire_conversations(now: datetime | None = None, limit: int = 200, contact_id: int | None = None) -> int:
    """Run the timeout handler of every conversation idle past its flow's timeout. Returns count.

    `now` can be moved forward (and `contact_id` narrowed) to wait out a timeout in development.
    """
    now = now or utcnow()
    query = (sa.select(Conversation.id)
             .where(Conversation.status == ConversationStatus.ACTIVE, Conversation.expires_at <= now)
             .order_by(Conversation.expires_at).limit(limit))
    if contact_id is not None:
        query = query.where(Conversation.contact_id == contact_id)
    due = db.session.scalars(query).all()
    db.session.commit()
    expired = 0
    flows = registry()
    for conversation_id in due:
        conversation = db.session.get(Conversation, conversation_id)
        lock_contact(conversation.contact_id)
        db.session.refresh(conversation)
        if conversation.status != ConversationStatus.ACTIVE or not conversation.expires_at \
                or conversation.expires_at > now:
            db.session.commit()  # a message moved it on meanwhile
            continue
        contact = db.session.get(Contact, conversation.contact_id)
        flow = flows.get(conversation.flow)
        try:
            with db.session.begin_nested():
                if flow is None:
                    end_conversation(conversation, ConversationStatus.EXPIRED)
                else:
                    apply_step(contact, conversation, flow, flow.expire(conversation.data or {}),
                               final_status=ConversationStatus.EXPIRED)
        except DBAPIError as exc:
            db.session.rollback()
            if is_transient(exc):
                raise  # still ACTIVE and due: the next run takes its timeout again
            # Retrying cannot fix it, and the next run would start with this conversation again,
            # holding every later timeout back: end it as a failing handler is ended (below).
            log.error("timeout handler of conversation %s failed: %s", conversation_id, type(exc).__name__)
            lock_contact(conversation.contact_id)
            db.session.refresh(conversation)
            if conversation.status == ConversationStatus.ACTIVE:
                end_conversation(conversation, ConversationStatus.EXPIRED, error=f"timeout handler: {_db_error_reason(exc)}")
        except Exception as exc:
            log.exception("timeout handler of conversation %s failed", conversation_id)
            end_conversation(conversation, ConversationStatus.EXPIRED, error=f"timeout handler: {type(exc).__name__}")
        db.session.commit()
        expired += 1
    return expired


def expire_handoffs(now: datetime | None = None) -> int:
    """Give back to the bot every contact whose handoff ran out (contact.handoff_ended, by expiry)."""
    ended = 0
    for contact_id in expired_handoffs(now):
        lock_contact(contact_id)
        contact = db.session.get(Contact, contact_id)
        db.session.refresh(contact)
        if contact.handoff_until is not None and not in_handoff(contact, now):
            end_handoff(contact, by=HandoffBy.EXPIRY)
            ended += 1
        db.session.commit()
    return ended
