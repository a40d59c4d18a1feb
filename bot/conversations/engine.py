"""The conversation engine: what the worker's tasks call to handle messages and conversations.

Runs in the worker only. Messages of one contact are handled one at a time and in arrival order
(invariant 6): every turn starts by locking the contact's row and then takes the contact's
*oldest* unprocessed message, whichever task got there first. Different contacts lock different
rows and run in parallel. A turn runs the message through the stages (`bot.conversations.stages`)
and commits consent, conversation and replies together; the replies' sends are enqueued by the
outbox once that commit succeeds.
"""
from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from bot.clock import utcnow
from bot.conversations.consent import Keywords, change_consent, opt_out_source
from bot.conversations.stages import Turn, obey_opt_out, run_stages
from bot.conversations.contacts import lock_contact
from bot.conversations.store import (answer_consent_questions, apply_step, end_conversation,
                                     end_open_conversations, open_conversation, send_replies, start_flow)
from bot.conversations.handoff import HandoffBy, end_handoff, expired_handoffs, in_handoff
from bot.delivery import events
from bot.extensions import db
from bot.models import Contact, Conversation, Message
from bot.vocabulary import Consent, ConversationStatus, Direction, Kind, MessageStatus, StartedBy
from flows import registry
from flows.toolkit import Reply

log = logging.getLogger(__name__)


def process_inbound(message_id: str) -> None:
    """Handle the contact's unprocessed messages, oldest first, until `message_id` is done."""
    target = db.session.get(Message, message_id)
    if target is None or target.direction != Direction.INBOUND:
        return
    contact_id = target.contact_id
    while True:
        lock_contact(contact_id)
        if db.session.scalar(sa.select(Message.status).where(Message.id == message_id)) != MessageStatus.RECEIVED:
            db.session.commit()
            return
        message = db.session.scalar(
            sa.select(Message)
            .where(Message.contact_id == contact_id, Message.direction == Direction.INBOUND,
                   Message.status == MessageStatus.RECEIVED)
            .order_by(Message.created_at, Message.id).limit(1)
        )
        _handle_safely(message)
        db.session.commit()  # consent, conversation and replies land together, before any send


def handle_message(contact: Contact, message: Message) -> list[Message]:
    """One turn through the stages; returns the replies it queued."""
    return run_stages(Turn.of(contact, message))


def _handle_safely(message: Message) -> list[Message]:
    """Handle one message; a failing flow costs an apology, never the message or the contact."""
    contact = db.session.get(Contact, message.contact_id)
    db.session.refresh(contact)
    try:
        with db.session.begin_nested():
            outgoing = handle_message(contact, message)
            message.status = MessageStatus.PROCESSED
            _report_received(contact, message, outgoing)
            return outgoing
    except DBAPIError:
        # The database, not the flow: a deadlock, a lost connection, "database is locked". The
        # message stays unprocessed and the task's retry (or the sweep) runs the turn again.
        db.session.rollback()
        raise
    except Exception as exc:
        log.exception("flow failed on inbound message %s", message.id)
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
    conversation = db.session.get(Conversation, conversation_id) if conversation_id else open_conversation(contact.id)
    events.message_received(message, contact, conversation=conversation,
                            answered=any(row.status != MessageStatus.FAILED for row in outgoing),
                            handoff=in_handoff(contact))


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
    if conversation.status != ConversationStatus.STARTING:
        db.session.commit()
        return
    contact = db.session.get(Contact, conversation.contact_id)
    db.session.refresh(contact)
    flow = registry().get(conversation.flow)
    if contact.consent == Consent.OPTED_OUT:
        end_conversation(conversation, ConversationStatus.CANCELLED, error="contact opted out")
    elif flow is None:
        end_conversation(conversation, ConversationStatus.FAILED, error=f"flow {conversation.flow!r} no longer exists")
    else:
        try:
            with db.session.begin_nested():
                start_flow(contact, flow, conversation.variables or {}, started_by=StartedBy.BACKEND,
                           conversation=conversation)
        except DBAPIError:
            db.session.rollback()
            raise  # still STARTING: the task's retry or the sweep starts it again
        except Exception as exc:
            log.exception("starting conversation %s failed", conversation_id)
            end_conversation(conversation, ConversationStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:500])
    db.session.commit()


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
        except DBAPIError:
            db.session.rollback()
            raise  # still ACTIVE and due: the next sweep runs its timeout
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
