"""The backend's API: POST /notify to send, GET /messages/<id> to see what happened."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, jsonify, request, url_for
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from bot.delivery import outbox
from bot.conversations.consent import opt_out_waiting
from bot.conversations.contacts import get_or_create_contact
from bot.conversations.handoff import in_handoff
from bot.extensions import db
from bot.models import Conversation, IdempotencyKey, Message, StatusEvent, is_public_id, new_id
from bot.http.schemas import InvalidRequest, NotifyRequest, parse_notify
from bot.twilio.whatsapp import within_window
from bot.vocabulary import Consent, ConversationStatus, Direction, IdempotentKind, Kind, MessageStatus, StartedBy
from bot.http.auth import require_api_token
from flows import registry

bp = Blueprint("notify", __name__)

MAX_IDEMPOTENCY_KEY = 255


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
        to=message.contact.phone,
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
        notification = parse_notify(payload, current_app.config["TWILIO_CONTENT_SIDS"], registry())
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

    contact = get_or_create_contact(notification.to)
    if contact.consent == Consent.OPTED_OUT or opt_out_waiting(contact.id):
        db.session.commit()
        return _error(409, f"{contact.phone} has opted out; nothing is sent until they opt back in")
    if notification.is_free_form and not within_window(contact.last_inbound_at):
        db.session.commit()
        return _error(
            422,
            f"{contact.phone} has not written in the last 24 hours, so WhatsApp allows no free-form "
            "message; send an approved template instead: {\"to\", \"template\", \"variables\"}",
            templates=sorted(current_app.config["TWILIO_CONTENT_SIDS"]),
        )
    if notification.flow is not None:
        if in_handoff(contact):
            db.session.commit()
            return _error(409, f"{contact.phone} is with a person (human handoff): the bot starts no flow until "
                               f"DELETE /contacts/{contact.phone}/handoff or the handoff ends")
        return _start_flow(notification, contact, key)

    message = _new_outbound(notification, contact.id, key)
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


def _start_flow(notification: NotifyRequest, contact, key: str | None):
    """Queue a backend-started conversation; the worker runs the flow (none of it runs here)."""
    flow = registry()[notification.flow]
    template = flow.start_content_template
    if not within_window(contact.last_inbound_at) and template not in current_app.config["TWILIO_CONTENT_SIDS"]:
        db.session.commit()
        return _error(
            422,
            f"{contact.phone} has not written in the last 24 hours; flow {flow.name!r} can open the "
            f"conversation outside the window only with its approved template "
            f"{template!r} configured in TWILIO_CONTENT_SIDS" if template else
            f"{contact.phone} has not written in the last 24 hours and flow {flow.name!r} has no "
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


def _new_outbound(notification: NotifyRequest, contact_id: int, key: str | None) -> Message:
    return Message(
        direction=Direction.OUTBOUND,
        contact_id=contact_id,
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
    events = db.session.scalars(
        sa.select(StatusEvent).where(StatusEvent.message_id == message.id).order_by(StatusEvent.id)
    ).all()
    return jsonify(message.to_dict(events=list(events)))
