"""The backend's API: POST /notify to send, GET /messages/<id> to see what happened."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, jsonify, request, url_for
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from bot.delivery import outbox
from bot.contacts import get_or_create_contact, opt_out_waiting
from bot.conversations.handoff import in_handoff
from bot.conversations.users import UserConflict, find_user, upsert_user
from bot.delivery import routing
from bot.delivery.routing import Content, Unusable
from bot.extensions import db
from bot.models import (Contact, Conversation, EmailEvent, IdempotencyKey, Message, StatusEvent, is_public_id,
                        new_id)
from bot.conversations.replies import TEMPLATES_DIR
from bot.http.schemas import InvalidRequest, NotifyRequest, parse_notify
from bot.channels.whatsapp.whatsapp import within_window
from bot.vocabulary import Channel, Consent, ConversationStatus, Direction, IdempotentKind, Kind, MessageStatus, StartedBy
from bot.http.auth import require_api_token
from flows import registry

bp = Blueprint("notify", __name__)

MAX_IDEMPOTENCY_KEY = 255


def email_templates() -> frozenset[str]:
    """The templates with email copy (templates/email/<name>/subject.txt): a user's notification
    may name one even when WhatsApp has no approved template of that name."""
    folder = TEMPLATES_DIR / "email"
    return frozenset(path.parent.name for path in folder.glob("*/subject.txt")) if folder.is_dir() else frozenset()


def read_json_body() -> Any:
    """The request's JSON, or None when it does not parse (including absurdly deep nesting)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def _error(status: int, message: str, **extra: Any):
    return jsonify(error=message, **extra), status


def _accepted(message: Message, replayed: bool = False):
    response = jsonify(
        id=message.id,
        status=message.status,
        channel=message.channel,
        user_id=message.contact.user_id,
        to=message.contact.address_on(message.channel),
        created_at=message.to_dict()["created_at"],
        url=url_for("notify.get_message", message_id=message.id),
    )
    response.status_code = 202
    response.headers["Location"] = url_for("notify.get_message", message_id=message.id)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _conversation_accepted(conversation: Conversation, replayed: bool = False):
    url = url_for("contacts_api.get_conversation", conversation_id=conversation.id)
    response = jsonify(
        id=conversation.id,
        status=conversation.status,
        to=conversation.contact.phone,
        flow=conversation.flow,
        created_at=conversation.to_dict()["started_at"],
        url=url,
    )
    response.status_code = 202
    response.headers["Location"] = url
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _replay(key: str, fingerprint: str):
    """The first answer for a reused Idempotency-Key, a 422 if the payload differs, or None.

    One key space for messages and flows (`IdempotencyKey`): a key first used for a flow and
    then for a message (or the other way round) is a different payload."""
    used = db.session.get(IdempotencyKey, key)
    if used is None:
        return None
    if used.request_hash != fingerprint:
        return _error(422, "this Idempotency-Key was already used with a different payload")
    if used.kind == IdempotentKind.CONVERSATION:
        conversation = db.session.scalar(
            sa.select(Conversation).options(selectinload(Conversation.contact)).where(Conversation.id == used.target_id))
        return _conversation_accepted(conversation, replayed=True)
    message = db.session.scalar(
        sa.select(Message).options(selectinload(Message.contact)).where(Message.id == used.target_id))
    return _accepted(message, replayed=True)


@bp.post("/notify")
@require_api_token
def notify():
    """Queue a WhatsApp message for a backend; answers 202 with the message id."""
    if not request.is_json:
        return _error(415, "Content-Type must be application/json")
    payload = read_json_body()
    if payload is None:
        return _error(400, "the body is not valid JSON")
    try:
        notification = parse_notify(payload, current_app.config["TWILIO_CONTENT_SIDS"], registry(),
                                    email_templates())
    except InvalidRequest as exc:
        return _error(400, str(exc))

    key = request.headers.get("Idempotency-Key")
    if key is not None:
        key = key.strip()
        if not key or len(key) > MAX_IDEMPOTENCY_KEY:
            return _error(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        replay = _replay(key, notification.fingerprint())
        if replay is not None:
            return replay

    if notification.user_id is not None:
        return _notify_user(notification, key)
    contact = get_or_create_contact(notification.to)
    if contact.consent == Consent.OPTED_OUT or opt_out_waiting(contact.id):
        db.session.commit()
        return _error(409, "the recipient has opted out of WhatsApp; nothing is sent until they opt back in")
    if notification.is_free_form and not within_window(contact.last_inbound_at):
        db.session.commit()
        return _window_closed()
    if notification.flow is not None:
        return _start_flow(notification, contact, key)
    return _queue(notification, contact, Channel.WHATSAPP, key)


def _window_closed():
    return _error(
        422,
        "the recipient has not written in the last 24 hours, so WhatsApp allows no free-form "
        "message; send an approved template instead: {\"to\", \"template\", \"variables\"}",
        templates=sorted(current_app.config["TWILIO_CONTENT_SIDS"]),
    )


def _queue(notification: NotifyRequest, contact: Contact, channel: str, key: str | None):
    """Store the message (the outbox) and answer 202; its send is enqueued after the commit."""
    message = _new_outbound(notification, contact.id, key, channel)
    outbox.defer_send(message)  # enqueued once the row is committed
    race = _commit_new_row(message, key, notification)
    if race is not None:
        return race
    return _accepted(message)


def _commit_new_row(row: Message | Conversation, key: str | None, notification: NotifyRequest):
    """Commit a new row, and its Idempotency-Key in the same transaction; if a concurrent request
    with the same key won the race (for a message or a flow alike), return that request's answer
    instead (None when the commit went through)."""
    db.session.add(row)
    if key:
        if row.id is None:
            row.id = new_id()  # the key names it before the flush
        kind = IdempotentKind.CONVERSATION if isinstance(row, Conversation) else IdempotentKind.MESSAGE
        db.session.add(IdempotencyKey(key=key, kind=kind, target_id=row.id, request_hash=notification.fingerprint()))
    try:
        db.session.commit()
        return None
    except IntegrityError:
        db.session.rollback()
        replay = _replay(key, notification.fingerprint()) if key else None
        if replay is None:
            raise
        return replay


def _notify_user(notification: NotifyRequest, key: str | None):
    """/notify by the backend's user id: store the inline `user`, then the first usable channel
    in the user's order (or the pinned one) carries the message (bot.delivery.routing)."""
    try:
        if notification.user is not None:
            contact, _ = upsert_user(notification.user_id, notification.user)
        else:
            contact = find_user(notification.user_id)
    except UserConflict as exc:
        db.session.rollback()
        return _error(409, str(exc))
    if contact is None:
        return _error(404, "no such user: store it first with PUT /users/<user_id>, or send its fields in 'user'")
    db.session.flush()
    if notification.flow is not None:
        if not contact.phone:
            db.session.commit()
            return _error(422, "flows run on WhatsApp and this user has no phone")
        if contact.consent == Consent.OPTED_OUT or opt_out_waiting(contact.id):
            db.session.commit()
            return _error(409, "the user has opted out of WhatsApp; nothing is sent until they opt back in")
        return _start_flow(notification, contact, key)
    content = Content(body=notification.body, subject=notification.subject, template=notification.template,
                      has_media=bool(notification.media_urls), whatsapp_template=notification.content_sid is not None,
                      email_template=notification.template in email_templates())
    stop_waiting = bool(contact.phone) and opt_out_waiting(contact.id)
    channel, skipped = routing.choose(contact, content, pinned=notification.channel, stop_waiting=stop_waiting)
    if channel is None:
        db.session.commit()  # the inline user is stored all the same
        reasons = {name: str(reason) for name, reason in skipped.items()}
        if Unusable.OPTED_OUT in skipped.values() and set(skipped.values()) <= {Unusable.OPTED_OUT, Unusable.NO_ADDRESS}:
            return _error(409, "the user has opted out of every channel that could reach them", skipped=reasons)
        if skipped == {Channel.WHATSAPP: Unusable.WINDOW_CLOSED}:
            return _window_closed()
        return _error(422, "no channel can carry this message to this user: "
                           + ", ".join(f"{name}: {reason}" for name, reason in reasons.items()), skipped=reasons)
    return _queue(notification, contact, channel, key)


def _start_flow(notification: NotifyRequest, contact, key: str | None):
    """Queue a backend-started conversation; the worker runs the flow (none of it runs here)."""
    if in_handoff(contact):
        db.session.commit()
        return _error(409, "the recipient is with a person (human handoff): the bot starts no flow until "
                           "DELETE /contacts/<phone>/handoff or the handoff ends")
    flow = registry()[notification.flow]
    template = flow.start_content_template
    if not within_window(contact.last_inbound_at) and template not in current_app.config["TWILIO_CONTENT_SIDS"]:
        db.session.commit()
        return _error(
            422,
            f"the recipient has not written in the last 24 hours; flow {flow.name!r} can open the "
            f"conversation outside the window only with its approved template "
            f"{template!r} configured in TWILIO_CONTENT_SIDS" if template else
            f"the recipient has not written in the last 24 hours and flow {flow.name!r} has no "
            "approved template to open the conversation with",
        )
    conversation = Conversation(
        contact_id=contact.id, flow=flow.name, status=ConversationStatus.STARTING, started_by=StartedBy.BACKEND,
        variables=notification.variables, data={}, idempotency_key=key,
        request_hash=notification.fingerprint() if key else None, backend_metadata=notification.metadata,
    )
    outbox.defer_conversation_start(conversation)
    race = _commit_new_row(conversation, key, notification)
    if race is not None:
        return race
    return _conversation_accepted(conversation)


def _new_outbound(notification: NotifyRequest, contact_id: int, key: str | None,
                  channel: str = Channel.WHATSAPP) -> Message:
    return Message(
        direction=Direction.OUTBOUND,
        contact_id=contact_id,
        channel=channel,
        subject=notification.subject,
        body=notification.body,
        media_urls=list(notification.media_urls) or None,
        template=notification.template,
        content_sid=notification.content_sid,
        variables=notification.variables or None,
        status=MessageStatus.PENDING,
        status_rank=MessageStatus.PENDING.rank,
        idempotency_key=key,
        request_hash=notification.fingerprint() if key else None,
        backend_metadata=notification.metadata,
        kind=Kind.AGENT if notification.agent else Kind.NOTIFICATION,
    )


@bp.get("/messages/<message_id>")
@require_api_token
def get_message(message_id: str):
    """A message's status, error, Twilio SID and the history of status callbacks."""
    if not is_public_id(message_id):
        abort(404, description=f"no message with id {message_id[:64]!r}")
    message = db.session.scalar(
        sa.select(Message).options(selectinload(Message.contact)).where(Message.id == message_id)
    )
    if message is None:
        abort(404, description=f"no message with id {message_id!r}")
    # The provider's callbacks about it: Twilio's status callbacks, or SendGrid's events.
    history = EmailEvent if message.channel == Channel.EMAIL else StatusEvent
    events = db.session.scalars(
        sa.select(history).where(history.message_id == message.id).order_by(history.id)
    ).all()
    data = message.to_dict(events=list(events))
    data["fallback"] = db.session.scalar(sa.select(Message.id).where(Message.fallback_of == message.id))
    return jsonify(data)
