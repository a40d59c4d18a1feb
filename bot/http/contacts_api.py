"""The backend's view of people and conversations: consent, history, and flow outcomes."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, jsonify

from bot.contacts import get_or_create_contact
from bot.extensions import db
from bot.http.notify import read_json_body
from bot.http.schemas import MAX_CONSENT_NOTE_CHARS, ConsentBody, InvalidRequest, validate
from bot.models import ConsentEvent, Contact, Conversation, is_public_id
from bot.phone import InvalidNumber, normalize_e164
from bot.http.auth import require_api_token
from bot.clock import isoformat

bp = Blueprint("contacts_api", __name__)


def phone_or_400(raw: str, field: str = "phone") -> str:
    """`raw` in E.164, or a 400 that names `field` and says what is wrong with the number."""
    try:
        return normalize_e164(raw)
    except InvalidNumber as exc:
        abort(400, description=f"{field} {exc}")


def _contact_dict(contact: Contact) -> dict:
    ledger = db.session.scalars(
        sa.select(ConsentEvent).where(ConsentEvent.contact_id == contact.id).order_by(ConsentEvent.id)).all()
    conversations = db.session.scalars(
        sa.select(Conversation).where(Conversation.contact_id == contact.id)
        .order_by(Conversation.started_at.desc()).limit(20)).all()
    return {
        "phone": contact.phone,
        "profile_name": contact.profile_name,
        "consent": contact.consent,
        "last_inbound_at": isoformat(contact.last_inbound_at),
        "consent_history": [event.to_dict() for event in ledger],
        "conversations": [conversation.to_dict() for conversation in conversations],
    }


@bp.get("/contacts/<phone>")
@require_api_token
def get_contact(phone: str):
    """A contact's consent, its ledger and recent conversations with their outcomes."""
    contact = db.session.scalar(sa.select(Contact).where(Contact.phone == phone_or_400(phone)))
    if contact is None:
        abort(404, description="no such contact")  # never the number itself in an error body
    return jsonify(_contact_dict(contact))


@bp.put("/contacts/<phone>/consent")
@require_api_token
def set_consent(phone: str):
    """Record consent the backend collected elsewhere (e.g. a checkbox): {"consent": "opted_in"}.

    Only opt-in and opt-out; opting someone out through the API sends them nothing.
    """
    try:
        body = validate(ConsentBody, read_json_body())
    except InvalidRequest as exc:
        abort(400, description=str(exc))
    # Imported here: the engine (flows, copy) is the worker's; this rare route needs one function.
    from bot.conversations.engine import set_consent_from_api

    contact = get_or_create_contact(phone_or_400(phone))
    set_consent_from_api(contact, body.consent, (body.note or "")[:MAX_CONSENT_NOTE_CHARS] or None)
    db.session.commit()
    return jsonify(_contact_dict(contact))


@bp.get("/conversations/<conversation_id>")
@require_api_token
def get_conversation(conversation_id: str):
    """A conversation's flow, state, status and outcome (what the user answered)."""
    if not is_public_id(conversation_id):
        abort(404, description=f"no conversation with id {conversation_id[:64]!r}")
    conversation = db.session.get(Conversation, conversation_id)
    if conversation is None:
        abort(404, description=f"no conversation with id {conversation_id!r}")
    return jsonify(conversation.to_dict())
