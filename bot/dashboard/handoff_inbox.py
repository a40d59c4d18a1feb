"""The handoff inbox: contacts waiting for a person, their recent messages, a reply box that
sends as the signed-in operator (`POST /notify` with `agent`: `notify.send_as_agent`) and "give
back to the bot" (`DELETE /contacts/<phone>/handoff`: `handoff_api.give_back_to_the_bot`)."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for

from bot.clock import utcnow
from bot.conversations.handoff import HandoffBy
from bot.extensions import db
from bot.http.handoff_api import give_back_to_the_bot
from bot.http.notify import send_as_agent
from bot.http.schemas import MAX_AGENT_CHARS
from bot.models import Contact, Message

bp = Blueprint("handoff", __name__)

#: Contacts listed at most, and recent messages shown per contact.
MAX_CONTACTS = 50
RECENT_MESSAGES = 10
MAX_REPLY_CHARS = 1600


@bp.get("/handoff")
def inbox():
    """Contacts in a handoff, the longest waiting first, each with its recent messages."""
    contacts = db.session.scalars(sa.select(Contact).where(Contact.handoff_until > utcnow())
                                  .order_by(Contact.updated_at).limit(MAX_CONTACTS)).all()
    recent = {contact.id: list(reversed(db.session.scalars(
        sa.select(Message).where(Message.contact_id == contact.id)
        .order_by(Message.created_at.desc(), Message.id.desc()).limit(RECENT_MESSAGES)).all()))
        for contact in contacts}
    return render_template("dashboard/handoff.html", contacts=contacts, recent=recent,
                           max_reply=MAX_REPLY_CHARS)


def _contact(contact_id: str) -> Contact:
    contact = db.session.get(Contact, int(contact_id)) if contact_id.isascii() and contact_id.isdigit() \
        and len(contact_id) < 12 else None
    if contact is None:
        abort(404, description="no such contact")
    return contact


@bp.post("/handoff/<contact_id>/reply")
def reply(contact_id: str):
    """Send the operator's text to the contact on WhatsApp, as an agent."""
    contact = _contact(contact_id)
    text = request.form.get("body", "").strip()
    if not text:
        abort(400, description="write a reply first: the message was empty")
    if len(text) > MAX_REPLY_CHARS:
        abort(400, description=f"a WhatsApp message holds at most {MAX_REPLY_CHARS} characters "
                               f"(this one has {len(text)})")
    if not contact.phone:
        abort(409, description="this contact has no WhatsApp number to answer on")
    # The operator's address names the agent (cut to the `agent` field's limit).
    status, answer = send_as_agent(contact.phone, text, g.operator.email[:MAX_AGENT_CHARS])
    if status != 202:
        abort(status if 400 <= status < 500 else 400, description=answer.get("error", "the reply was refused"))
    flash("Reply queued; it leaves in the conversation lane.")
    return redirect(url_for("dashboard.handoff.inbox") + f"#contact-{contact.id}")


@bp.post("/handoff/<contact_id>/end")
def give_back(contact_id: str):
    """End the handoff: the bot answers this contact again."""
    contact = _contact(contact_id)
    give_back_to_the_bot(contact, by=HandoffBy.OPERATOR)
    flash("Given back to the bot.")
    return redirect(url_for("dashboard.handoff.inbox"))
