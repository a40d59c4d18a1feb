"""Conversations in the database: opening and closing them, storing a step, queueing replies.

What the engine's stages and its task entry points share (the per-contact lock is in
contacts.py). Nothing here commits: the caller's turn commits consent, conversation and replies together, and the outbox enqueues the replies' sends
after that commit (docs/ARCHITECTURE.md, invariants 1 and 4).

Nothing here flushes either: ids are made here, not by the database, so a turn's writes wait in
the session and go out together at its end (docs/ARCHITECTURE.md, "Inbound"). The reads
below answer for what the session holds, flushed or not: a conversation started or ended in this
transaction counts as the database will have it once it commits.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Iterable, Mapping

import sqlalchemy as sa

from bot.clock import utcnow
from bot.conversations.consent import record_decline
from bot.conversations.replies import build_messages
from bot.delivery import events, outbox
from bot.extensions import db
from bot.models import Contact, Conversation, Message, new_id
from bot.vocabulary import (OPEN_CONVERSATION, Consent, ConsentAction, ConversationStatus, EventType, Kind,
                            MessageStatus, StartedBy)
from flows.toolkit import END, Flow, Reply, Step


@functools.cache
def _open_conversation_statement() -> sa.Select:
    # Built once: composing an ORM select costs more CPU than running it (bench/THROUGHPUT.md,
    # "The worker's hot path").
    return (sa.select(Conversation)
            .where(Conversation.contact_id == sa.bindparam("contact_id"),
                   Conversation.status == ConversationStatus.ACTIVE)
            .order_by(Conversation.started_at.desc()).limit(1))


#: Key in `Session.info`: {contact id: its active conversation or None}, as read under the
#: contact's lock earlier in this transaction (the engine's turn read, `remember_open_conversation`).
_KNOWN_OPEN = "conversations_known_open"


def remember_open_conversation(contact_id: int, conversation: Conversation | None) -> None:
    """Note the contact's active conversation (or that it has none), read under its lock in this
    transaction, so `open_conversation` need not ask again until the transaction ends or flushes."""
    db.session().info.setdefault(_KNOWN_OPEN, {})[contact_id] = conversation


@sa.event.listens_for(sa.orm.Session, "after_flush")
@sa.event.listens_for(sa.orm.Session, "after_commit")
@sa.event.listens_for(sa.orm.Session, "after_rollback")
def _forget_known_open(session: sa.orm.Session, *_: object) -> None:
    # What was read holds only while nothing else could have changed it: not past the lock's
    # transaction, and not past a flush (whose rows the remembered answer does not include).
    session.info.pop(_KNOWN_OPEN, None)


def _started_here(contact_id: int) -> list[Conversation]:
    """The contact's conversations added in this transaction and not flushed yet."""
    return [row for row in db.session.new if isinstance(row, Conversation) and row.contact_id == contact_id]


def open_conversation(contact_id: int) -> Conversation | None:
    """The contact's active conversation, if any (the latest started)."""
    started = [row for row in _started_here(contact_id) if row.status == ConversationStatus.ACTIVE]
    if started:
        return max(started, key=lambda row: row.started_at)
    known = db.session.info.get(_KNOWN_OPEN, {})
    if contact_id in known:
        conversation = known[contact_id]
        if conversation is None or conversation.status == ConversationStatus.ACTIVE:
            return conversation
    stored = db.session.scalar(_open_conversation_statement(), {"contact_id": contact_id})
    if stored is None or stored.status == ConversationStatus.ACTIVE:
        return stored
    # Ended in this transaction, not flushed: the one before it, if any is still active.
    active = [row for row in open_conversations(contact_id) if row.status == ConversationStatus.ACTIVE]
    return max(active, key=lambda row: row.started_at, default=None)


def open_conversations(contact_id: int) -> list[Conversation]:
    """Every conversation of the contact not yet ended (starting or active)."""
    stored = list(db.session.scalars(sa.select(Conversation).where(
        Conversation.contact_id == contact_id, Conversation.status.in_(OPEN_CONVERSATION))))
    return [row for row in stored + _started_here(contact_id) if row.status in OPEN_CONVERSATION]


@functools.cache
def _has_run_statement() -> sa.Select:
    return (sa.select(Conversation.id).where(Conversation.contact_id == sa.bindparam("contact_id"),
                                             Conversation.flow == sa.bindparam("flow")).limit(1))


def has_run(contact_id: int, flow: Flow) -> bool:
    """Whether `flow` ever ran for this contact (a first-contact flow runs once)."""
    if any(row.flow == flow.name for row in _started_here(contact_id)):
        return True
    return db.session.scalar(_has_run_statement(), {"contact_id": contact_id, "flow": flow.name}) is not None


def new_conversation(contact: Contact, flow: Flow, *, started_by: StartedBy,
                     variables: dict[str, Any] | None = None) -> Conversation:
    """An active conversation of `flow` for the contact, added to the session (not flushed: its
    id and start time are known now)."""
    _check_json(variables, "variables")
    conversation = Conversation(id=new_id(), contact_id=contact.id, flow=flow.name, status=ConversationStatus.ACTIVE,
                                started_by=started_by, variables=variables, data={}, started_at=utcnow())
    db.session.add(conversation)
    events.conversation_event(EventType.CONVERSATION_STARTED, conversation, contact.phone)
    return conversation


def end_conversation(conversation: Conversation, status: ConversationStatus, *, error: str | None = None,
                     outcome: dict[str, Any] | None = None, now: datetime | None = None) -> None:
    """Close a conversation: its final status, the END state, no more timeout; the backend hears
    of it (conversation.completed / expired / cancelled / failed) in the same transaction."""
    conversation.status = status
    conversation.state = END
    conversation.expires_at = None
    conversation.ended_at = now or utcnow()
    if outcome is not None:
        conversation.outcome = outcome
    if error:
        conversation.error = error
    events.conversation_event(events.CONVERSATION_ENDED[status], conversation, _phone_of(conversation))


def _phone_of(conversation: Conversation) -> str:
    # The contact is in the session's identity map during a turn: no statement then.
    return db.session.get(Contact, conversation.contact_id).phone


def _check_json(value: Any, what: str) -> None:
    """A flow's data, outcome or variables must survive storage as JSON. Checked here, where a
    flow that breaks the rule fails its turn (an apology, docs/conversations.md), rather than
    at the commit's flush, which would fail the whole transaction."""
    if value is not None:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the conversation's {what} are not JSON: {exc}") from None


def end_open_conversations(contact_id: int, status: ConversationStatus, *, error: str | None = None) -> None:
    """End every open conversation of the contact."""
    for conversation in open_conversations(contact_id):
        end_conversation(conversation, status, error=error)


def answer_consent_question(conversation: Conversation) -> None:
    """The contact opted in (a keyword, the API, before it even began): the flow that asks for
    consent has its answer and ends."""
    end_conversation(conversation, ConversationStatus.COMPLETED, outcome={"consent": Consent.OPTED_IN.value})


def answer_consent_questions(contact_id: int, flows: Mapping[str, Flow]) -> None:
    """End each of the contact's open conversations whose flow asks for consent, answered."""
    for conversation in open_conversations(contact_id):
        flow = flows.get(conversation.flow)
        if flow is not None and flow.asks_consent:
            answer_consent_question(conversation)


def start_flow(contact: Contact, flow: Flow, variables: dict[str, Any], *, started_by: StartedBy,
               conversation: Conversation | None = None) -> list[Message]:
    """Run a flow's `start` for the contact (replacing any open conversation); returns replies.

    A flow that asks for consent is never opened for a contact who already gave it: it ends at
    once, answered, and nothing is sent.
    """
    for other in open_conversations(contact.id):
        # A flow held for later (a send_at, quiet hours) is not open yet: it starts at its time.
        if (conversation is None or other.id != conversation.id) and not other.is_held:
            end_conversation(other, ConversationStatus.CANCELLED, error="replaced by a newer conversation")
    if conversation is None:
        conversation = new_conversation(contact, flow, started_by=started_by, variables=variables)
    else:  # started by the backend: it leaves STARTING now
        events.conversation_event(EventType.CONVERSATION_STARTED, conversation, contact.phone)
    if flow.asks_consent and contact.consent == Consent.OPTED_IN:
        answer_consent_question(conversation)
        return []
    return apply_step(contact, conversation, flow, flow.begin(variables))


def apply_step(contact: Contact, conversation: Conversation, flow: Flow, step: Step,
               final_status: ConversationStatus = ConversationStatus.COMPLETED) -> list[Message]:
    """Persist a step's state, data and outcome, and build its replies."""
    now = utcnow()
    _check_json(step.data, "data")
    _check_json(step.outcome, "outcome")
    conversation.data = dict(step.data)
    if step.outcome is not None:
        conversation.outcome = dict(step.outcome)
        if flow.asks_consent and step.outcome.get("consent") == ConsentAction.DECLINED:
            record_decline(contact)
    if step.state == END:
        end_conversation(conversation, final_status, now=now)
    else:
        conversation.state = step.state
        conversation.status = ConversationStatus.ACTIVE
        conversation.expires_at = now + flow.timeout if flow.timeout else None
    conversation.updated_at = now
    return send_replies(contact, step.replies, conversation)


def send_replies(contact: Contact, replies: Iterable[Reply], conversation: Conversation | None = None,
                 kind: Kind = Kind.REPLY) -> list[Message]:
    """Message rows for `replies`, added to the session (not flushed: their ids are known now);
    their sends go out after the commit."""
    rows = build_messages(replies, contact, conversation_id=conversation.id if conversation else None, kind=kind)
    for row in rows:
        row.id = new_id()
    db.session.add_all(rows)
    for row in rows:
        if row.status == MessageStatus.PENDING:  # a skipped reply (window, length) is never sent
            outbox.defer_send(row)
    return rows
