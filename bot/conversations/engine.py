"""The conversation engine: runs each inbound message through consent keywords and flows.

Runs in the worker only. Messages of one contact are handled one at a time and in arrival order:
every turn starts by locking the contact's row (an UPDATE, the first statement of its
transaction: a row lock on PostgreSQL, the write lock on SQLite) and then takes the contact's
*oldest* unprocessed message, whichever task got there first. Different contacts lock different
rows and run in parallel.
"""
from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from bot.delivery import outbox
from bot.clock import utcnow
from bot.conversations.consent import (Keywords, change_consent, is_sandbox_join, opt_out_source, record_decline,
                         typed_words)
from bot.extensions import db
from bot.models import Consent, Contact, Conversation, ConversationStatus, Direction, Kind, Message
from bot.conversations.replies import build_messages
from flows import registry
from flows.toolkit import END, Flow, Inbound, Reply, Step, UnknownState

log = logging.getLogger(__name__)


def lock_contact(contact_id: int) -> None:
    """Take the per-contact lock for the rest of the current transaction."""
    db.session.commit()  # the lock must be the transaction's first statement (see module doc)
    db.session.execute(
        sa.update(Contact).where(Contact.id == contact_id).values(updated_at=Contact.updated_at)
        .execution_options(synchronize_session=False)
    )


def process_inbound(message_id: str) -> None:
    """Handle the contact's unprocessed messages, oldest first, until `message_id` is done."""
    target = db.session.get(Message, message_id)
    if target is None or target.direction != Direction.INBOUND:
        return
    contact_id = target.contact_id
    while True:
        lock_contact(contact_id)
        if db.session.scalar(sa.select(Message.status).where(Message.id == message_id)) != "received":
            db.session.commit()
            return
        message = db.session.scalar(
            sa.select(Message)
            .where(Message.contact_id == contact_id, Message.direction == Direction.INBOUND,
                   Message.status == "received")
            .order_by(Message.created_at, Message.id).limit(1)
        )
        outgoing = _handle_safely(message)
        db.session.commit()  # consent, conversation and replies land together, before any send
        for row in outgoing:
            if row.status == "pending":
                outbox.enqueue_send(row.id)


def _handle_safely(message: Message) -> list[Message]:
    """Handle one message; a failing flow costs an apology, never the message or the contact."""
    contact = db.session.get(Contact, message.contact_id)
    db.session.refresh(contact)
    try:
        with db.session.begin_nested():
            outgoing = handle_message(contact, message)
            message.status = "processed"
            return outgoing
    except DBAPIError:
        # The database, not the flow: a deadlock, a lost connection, "database is locked". The
        # message stays unprocessed and the task's retry (or the sweep) runs the turn again.
        db.session.rollback()
        raise
    except Exception as exc:
        log.exception("flow failed on inbound message %s", message.id)
        db.session.refresh(contact)
        message.status = "processed"
        message.error_message = f"handler error: {type(exc).__name__}"
        if message.kind == Kind.OPT_OUT_REQUEST:
            # Whatever broke (the confirmation's copy, say), a STOP is obeyed: consent first,
            # and then silence rather than an apology.
            _obey_opt_out(contact, message,
                          opt_out_source(message.payload or {}, Keywords.from_config()) or "keyword")
            return []
        conversation = open_conversation(contact.id)
        if conversation is not None:
            # End it, so the contact's next message starts fresh instead of failing again.
            end_conversation(conversation, ConversationStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:500])
        return _send(contact, [Reply("common/error")])


def handle_message(contact: Contact, message: Message) -> list[Message]:
    """One turn: consent keywords, then the open conversation, then entry points; returns replies."""
    payload = message.payload or {"Body": message.body or ""}
    inbound = Inbound.from_twilio(payload)
    words = typed_words(payload)
    keywords = Keywords.from_config()
    advanced = str(payload.get("OptOutType") or "").upper()  # Twilio Advanced Opt-Out
    flows = registry()

    opt_out = opt_out_source(payload, keywords)
    if opt_out:
        return _opt_out(contact, message, opt_out)
    if is_sandbox_join(payload):
        return _opt_in(contact, message, "sandbox_join")
    if (words in keywords.opt_in or advanced == "START") and contact.consent != Consent.OPTED_IN \
            and not _answers_open_flow(contact, inbound, flows,
                                       strong=words in _UNAMBIGUOUS_OPT_IN or advanced == "START"):
        return _opt_in(contact, message, "keyword")
    if contact.consent == Consent.OPTED_OUT:
        log.info("message from opted-out %s recorded, not answered", contact.phone)
        return []
    if words in keywords.help or advanced == "HELP":
        return _send(contact, [Reply("common/help")])

    conversation = open_conversation(contact.id)
    if conversation is not None and conversation.flow == "welcome":
        handed_over = _leave_welcome_for_an_entry_point(contact, conversation, inbound, flows)
        if handed_over is not None:
            return handed_over
    if conversation is not None:
        flow = flows.get(conversation.flow)
        try:
            if flow is None:
                raise UnknownState(f"flow {conversation.flow!r} no longer exists")
            step = flow.handle(conversation.state, inbound, conversation.data or {})
        except UnknownState as exc:
            return _restart(contact, conversation, flow, inbound, str(exc))
        if step is None:
            return _send(contact, [Reply("common/not_understood")], conversation)
        return apply_step(contact, conversation, flow, step)

    started = _start_by_entry_point(contact, inbound, flows)
    if started is not None:
        return started

    if contact.consent == Consent.UNKNOWN and "welcome" in flows and not _was_welcomed(contact.id):
        return start_flow(contact, flows["welcome"], {"name": contact.profile_name}, started_by="user")
    if words in keywords.opt_in and contact.consent == Consent.OPTED_IN:
        return _send(contact, [Reply("subscription/already_subscribed", {"name": contact.profile_name})])
    if words in GREETINGS:
        return _send(contact, [Reply("common/greeting", {"name": contact.profile_name})])
    return _send(contact, [Reply("common/not_understood")])


#: Hellos that deserve a hello back rather than "Sorry, I didn't get that".
GREETINGS = frozenset({"hi", "hello", "hey", "hiya", "hallo", "hola", "good morning", "good afternoon",
                       "good evening", "hi there", "hello there"})


def _was_welcomed(contact_id: int) -> bool:
    """Whether the welcome ever ran for this contact: it asks once, the first time they write."""
    return db.session.scalar(
        sa.select(Conversation.id).where(Conversation.contact_id == contact_id, Conversation.flow == "welcome")
        .limit(1)) is not None


def _leave_welcome_for_an_entry_point(contact: Contact, welcome: Conversation, inbound: Inbound,
                                      flows: dict[str, Flow]) -> list[Message] | None:
    """A contact asked to opt in who instead starts something (types FEEDBACK): do that.

    The welcome ends without an answer; None when the message is the welcome's to handle.
    """
    welcome_flow = flows.get("welcome")
    if welcome_flow is not None and welcome_flow.expects(welcome.state, inbound):
        return None
    started = _start_by_entry_point(contact, inbound, flows)
    if started is not None:
        welcome.outcome = {"consent": "no_answer"}
        end_conversation(welcome, ConversationStatus.COMPLETED)
    return started


def _start_by_entry_point(contact: Contact, inbound: Inbound, flows: dict[str, Flow]) -> list[Message] | None:
    """Start the first flow whose entry point takes this message; None when none does."""
    for flow in flows.values():
        step = flow.handle(None, inbound, {})
        if step is not None:
            return apply_step(contact, _new_conversation(contact, flow, started_by="user"), flow, step)
    return None


#: Opt-in words that mean nothing else. "YES" also answers questions ("Reply YES to confirm").
_UNAMBIGUOUS_OPT_IN = frozenset({"start", "unstop", "subscribe"})


def _answers_open_flow(contact: Contact, inbound: Inbound, flows: dict[str, Flow], *, strong: bool) -> bool:
    """Whether an opt-in word is the answer to an open flow's question rather than an opt-in.

    A contact of unknown consent whom the backend sent an appointment reminder answers "Yes" to
    confirm it. Opted-out contacts have no open conversation, so for them YES always opts in.
    """
    if strong or contact.consent != Consent.UNKNOWN:
        return False
    conversation = open_conversation(contact.id)
    if conversation is None or conversation.flow == "welcome" or conversation.flow not in flows:
        return False
    # Only a route made for this answer counts ("yes" to "Reply YES to confirm"), not a
    # catch-all that would take any text (a comment box, a re-ask).
    return flows[conversation.flow].expects(conversation.state, inbound)


def open_conversation(contact_id: int) -> Conversation | None:
    """The contact's active conversation, if any."""
    return db.session.scalar(
        sa.select(Conversation)
        .where(Conversation.contact_id == contact_id, Conversation.status == ConversationStatus.ACTIVE)
        .order_by(Conversation.started_at.desc()).limit(1)
    )


def start_flow(contact: Contact, flow: Flow, variables: dict, *, started_by: str,
               conversation: Conversation | None = None) -> list[Message]:
    """Run a flow's `start` for the contact (replacing any open conversation); returns replies."""
    for other in db.session.scalars(sa.select(Conversation).where(
            Conversation.contact_id == contact.id, Conversation.status.in_(ConversationStatus.OPEN))):
        if conversation is None or other.id != conversation.id:
            end_conversation(other, ConversationStatus.CANCELLED, error="replaced by a newer conversation")
    if conversation is None:
        conversation = _new_conversation(contact, flow, started_by=started_by, variables=variables)
    step = flow.begin(variables)
    return apply_step(contact, conversation, flow, step)


def apply_step(contact: Contact, conversation: Conversation, flow: Flow, step: Step,
               final_status: str = ConversationStatus.COMPLETED) -> list[Message]:
    """Persist a step's state, data and outcome, and build its replies."""
    now = utcnow()
    conversation.data = dict(step.data)
    if step.outcome is not None:
        conversation.outcome = dict(step.outcome)
        if conversation.flow == "welcome" and step.outcome.get("consent") == "declined":
            record_decline(contact)
    if step.state == END:
        end_conversation(conversation, final_status, now=now)
    else:
        conversation.state = step.state
        conversation.status = ConversationStatus.ACTIVE
        conversation.expires_at = now + flow.timeout if flow.timeout else None
    conversation.updated_at = now
    return _send(contact, step.replies, conversation)


def _send(contact: Contact, replies, conversation: Conversation | None = None,
          kind: str = Kind.REPLY) -> list[Message]:
    rows = build_messages(replies, contact, conversation_id=conversation.id if conversation else None, kind=kind)
    db.session.add_all(rows)
    db.session.flush()
    return rows


def _new_conversation(contact: Contact, flow: Flow, *, started_by: str, variables: dict | None = None) -> Conversation:
    conversation = Conversation(contact_id=contact.id, flow=flow.name, status=ConversationStatus.ACTIVE,
                                started_by=started_by, variables=variables, data={})
    db.session.add(conversation)
    db.session.flush()
    return conversation


def end_conversation(conversation: Conversation, status: str, *, error: str | None = None,
                     now: datetime | None = None) -> None:
    """Close a conversation: its final status, the END state, no more timeout. Does not commit."""
    conversation.status = status
    conversation.state = END
    conversation.expires_at = None
    conversation.ended_at = now or utcnow()
    if error:
        conversation.error = error


def _opt_out(contact: Contact, message: Message, source: str) -> list[Message]:
    if not _obey_opt_out(contact, message, source):
        return []  # already opted out: the one confirmation was sent then
    return _send(contact, [Reply("subscription/opted_out")], kind=Kind.OPT_OUT_CONFIRMATION)


def _obey_opt_out(contact: Contact, message: Message, source: str = "keyword") -> bool:
    """Opt the contact out and cancel their conversations; False if they already were."""
    if not change_consent(contact, Consent.OPTED_OUT, source=source, words=message.body,
                          message_sid=message.twilio_sid):
        return False
    for conversation in db.session.scalars(sa.select(Conversation).where(
            Conversation.contact_id == contact.id, Conversation.status.in_(ConversationStatus.OPEN))):
        end_conversation(conversation, ConversationStatus.CANCELLED, error="contact opted out")
    return True


def _opt_in(contact: Contact, message: Message, source: str) -> list[Message]:
    changed = change_consent(contact, Consent.OPTED_IN, source=source, words=message.body,
                             message_sid=message.twilio_sid)
    conversation = open_conversation(contact.id)
    if conversation is not None and conversation.flow == "welcome":
        conversation.outcome = {"consent": "opted_in"}
        end_conversation(conversation, ConversationStatus.COMPLETED)
    if not changed and source == "keyword":
        return []
    return _send(contact, [Reply("subscription/opted_in", {"name": contact.profile_name})])


def _restart(contact: Contact, stale: Conversation, flow: Flow | None, inbound: Inbound, reason: str) -> list[Message]:
    """A stored state the flow no longer has: restart the flow rather than crash."""
    log.warning("conversation %s restarted: %s", stale.id, reason)
    end_conversation(stale, ConversationStatus.FAILED, error=f"restarted: {reason}")
    replies = _send(contact, [Reply("common/restarted")])
    if flow is not None and flow.start is not None:
        # Begin again from the top, with what it was started with (a user-started flow: the
        # same variables the engine gives it when it starts one).
        variables = stale.variables if stale.variables is not None else {"name": contact.profile_name}
        return replies + start_flow(contact, flow, variables, started_by=stale.started_by)
    if flow is not None:
        step = flow.handle(None, inbound, {})
        if step is not None:
            return replies + apply_step(contact, _new_conversation(contact, flow, started_by="user"), flow, step)
    return replies


# --- tasks' entry points besides inbound messages ---------------------------------------------

def start_conversation(conversation_id: str) -> None:
    """Start a conversation the backend asked for (POST /notify with "flow")."""
    conversation = db.session.get(Conversation, conversation_id)
    if conversation is None:
        return
    lock_contact(conversation.contact_id)
    db.session.refresh(conversation)
    if conversation.status != ConversationStatus.STARTING:
        db.session.commit()
        return
    contact = db.session.get(Contact, conversation.contact_id)
    db.session.refresh(contact)
    flow = registry().get(conversation.flow)
    outgoing: list[Message] = []
    if contact.consent == Consent.OPTED_OUT:
        end_conversation(conversation, ConversationStatus.CANCELLED, error="contact opted out")
    elif flow is None:
        end_conversation(conversation, ConversationStatus.FAILED, error=f"flow {conversation.flow!r} no longer exists")
    else:
        try:
            with db.session.begin_nested():
                outgoing = start_flow(contact, flow, conversation.variables or {}, started_by="backend",
                                      conversation=conversation)
        except DBAPIError:
            db.session.rollback()
            raise  # still STARTING: the task's retry or the sweep starts it again
        except Exception as exc:
            log.exception("starting conversation %s failed", conversation_id)
            end_conversation(conversation, ConversationStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:500])
    db.session.commit()
    for row in outgoing:
        if row.status == "pending":
            outbox.enqueue_send(row.id)


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
        outgoing: list[Message] = []
        try:
            with db.session.begin_nested():
                if flow is None:
                    end_conversation(conversation, ConversationStatus.EXPIRED)
                else:
                    outgoing = apply_step(contact, conversation, flow, flow.expire(conversation.data or {}),
                                          final_status=ConversationStatus.EXPIRED)
        except DBAPIError:
            db.session.rollback()
            raise  # still ACTIVE and due: the next sweep runs its timeout
        except Exception as exc:
            log.exception("timeout handler of conversation %s failed", conversation_id)
            end_conversation(conversation, ConversationStatus.EXPIRED, error=f"timeout handler: {type(exc).__name__}")
        db.session.commit()
        expired += 1
        for row in outgoing:
            if row.status == "pending":
                outbox.enqueue_send(row.id)
    return expired
