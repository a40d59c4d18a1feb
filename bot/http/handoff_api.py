"""POST / DELETE /contacts/<phone>/handoff: a person takes over a contact from the bot, and gives
it back (bot/conversations/handoff.py)."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, jsonify, request

from bot.clock import isoformat
from bot.contacts import get_or_create_contact, lock_contact
from bot.conversations.handoff import HandoffBy, end_handoff, in_handoff, start_handoff
from bot.extensions import db
from bot.http.auth import require_api_token
from bot.http.contacts_api import phone_or_400
from bot.http.notify import read_json_body
from bot.http.schemas import HandoffBody, InvalidRequest, validate
from bot.models import Contact

bp = Blueprint("handoff_api", __name__)


def _answer(contact: Contact):
    return jsonify(phone=contact.phone, handoff=in_handoff(contact), until=isoformat(contact.handoff_until),
                   reason=contact.handoff_reason)


@bp.post("/contacts/<phone>/handoff")
@require_api_token
def start(phone: str):
    """Pause the bot for this contact: {"reason": "...", "hours": 24} (both optional)."""
    payload = read_json_body() if request.data else {}
    try:
        body = validate(HandoffBody, payload)
    except InvalidRequest as exc:
        abort(400, description=str(exc))
    contact = get_or_create_contact(phone_or_400(phone))
    lock_contact(contact.id)  # not in the middle of a turn of theirs (invariant 6)
    db.session.refresh(contact)
    start_handoff(contact, reason=body.reason, by=HandoffBy.API, hours=body.hours)
    db.session.commit()
    return _answer(contact)


@bp.delete("/contacts/<phone>/handoff")
@require_api_token
def end(phone: str):
    """Give the contact back to the bot (200 whether or not a handoff was running)."""
    contact = db.session.scalar(sa.select(Contact).where(Contact.phone == phone_or_400(phone)))
    if contact is None:
        abort(404, description="no such contact")
    give_back_to_the_bot(contact, by=HandoffBy.API)
    return _answer(contact)


def give_back_to_the_bot(contact: Contact, *, by: str) -> None:
    """End the contact's handoff under its lock (invariant 6) and commit: DELETE above, and the
    dashboard's "give back to the bot"."""
    lock_contact(contact.id)
    db.session.refresh(contact)
    end_handoff(contact, by=by)
    db.session.commit()
