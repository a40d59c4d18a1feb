"""POST / DELETE /contacts/<phone>/handoff: a person takes over a contact from the bot, and gives
it back (bot/conversations/handoff.py)."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, jsonify, request

from bot.clock import isoformat
from bot.conversations.contacts import get_or_create_contact, lock_contact
from bot.conversations.handoff import HandoffBy, end_handoff, in_handoff, start_handoff
from bot.extensions import db
from bot.http.auth import require_api_token
from bot.models import Contact
from bot.phone import InvalidNumber, normalize_e164

bp = Blueprint("handoff_api", __name__)

MAX_REASON = 500
MAX_HOURS = 24 * 30


def _phone(raw: str) -> str:
    try:
        return normalize_e164(raw)
    except InvalidNumber as exc:
        abort(400, description=f"phone {exc}")


def _answer(contact: Contact):
    return jsonify(phone=contact.phone, handoff=in_handoff(contact), until=isoformat(contact.handoff_until),
                   reason=contact.handoff_reason)


@bp.post("/contacts/<phone>/handoff")
@require_api_token
def start(phone: str):
    """Pause the bot for this contact: {"reason": "...", "hours": 24} (both optional)."""
    payload = request.get_json(silent=True) if request.data else {}
    if not isinstance(payload, dict):
        abort(400, description='the body must be a JSON object: {"reason": "...", "hours": 24}')
    unknown = sorted(set(payload) - {"reason", "hours"})
    if unknown:
        abort(400, description=f"unknown field {unknown[0]!r}: only reason and hours")
    reason = payload.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON or "\x00" in reason):
        abort(400, description=f"reason: text of at most {MAX_REASON} characters")
    hours = payload.get("hours")
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float))
                              or not 0 < hours <= MAX_HOURS):
        abort(400, description=f"hours: a number above 0 and at most {MAX_HOURS}")
    contact = get_or_create_contact(_phone(phone))
    lock_contact(contact.id)  # not in the middle of a turn of theirs (invariant 6)
    db.session.refresh(contact)
    start_handoff(contact, reason=reason, by=HandoffBy.API, hours=hours)
    db.session.commit()
    return _answer(contact)


@bp.delete("/contacts/<phone>/handoff")
@require_api_token
def end(phone: str):
    """Give the contact back to the bot (200 whether or not a handoff was running)."""
    contact = db.session.scalar(sa.select(Contact).where(Contact.phone == _phone(phone)))
    if contact is None:
        abort(404, description="no such contact")
    lock_contact(contact.id)
    db.session.refresh(contact)
    end_handoff(contact, by=HandoffBy.API)
    db.session.commit()
    return _answer(contact)
