"""What mail providers call: SendGrid's Event Webhook and the one-click unsubscribe link.

`POST /sendgrid/events` is verified (ECDSA P-256 over the timestamp and the raw body,
bot.channels.email.signature) and applies each event once (`sg_event_id`, invariant 2): statuses
only upward (invariant 3), an unsubscribe or spam report opts the address out of email alone
(invariant 14), a bounce or drop may hand the notification to the user's next channel
(invariant 13, through statuses.raise_status). Events about an email we do not know are
acknowledged and counted, never a 5xx: SendGrid would retry them for a day.

`/unsubscribe/<token>` is RFC 8058's one-click link: a POST from the mailbox provider opts the
user out of email; a GET (a person, or a link scanner) only shows a page with the button.
"""
from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, jsonify, render_template_string, request
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.clock import utcnow
from bot.channels.email.unsubscribe import read_token
from bot.channels.email.webhook_events import BadBatch, EmailEvent, parse_batch
from bot.conversations.consent import change_email_consent
from bot.delivery.statuses import raise_status
from bot.extensions import db
from bot.metrics import counters as metrics
from bot.models import Contact, EmailEvent as StoredEmailEvent, Message
from bot.vocabulary import Channel, Consent

log = logging.getLogger(__name__)
bp = Blueprint("email_hooks", __name__)

#: SendGrid posts batches of up to ~768 KB (docs: "Event Webhook"); the app's default body limit
#: is smaller, so this route alone allows a megabyte.
MAX_BATCH_BYTES = 1024 * 1024


@bp.post("/sendgrid/events")
def sendgrid_events():
    """Apply one signed batch of SendGrid events; 200 with what was applied."""
    # Imported here: the verification needs cryptography, megabytes that a web process which
    # never hears from SendGrid does not carry (bench/THROUGHPUT.md, "The web's hot path": RSS).
    from bot.channels.email.signature import InvalidPublicKey, Refusal, load_public_key, verify

    request.max_content_length = MAX_BATCH_BYTES
    configured = current_app.config.get("SENDGRID_WEBHOOK_PUBLIC_KEY")
    if not configured:
        abort(403, description="SENDGRID_WEBHOOK_PUBLIC_KEY is not set: events cannot be verified")
    try:
        key = load_public_key(configured)
    except InvalidPublicKey as exc:
        log.error("%s", exc)
        abort(403, description="the configured SendGrid public key is not usable")
    body = request.get_data(cache=False)
    verdict = verify(key, request.headers, body)
    if not verdict.ok:
        status = 401 if verdict.refusal in (Refusal.MISSING, Refusal.MALFORMED) else 403
        abort(status, description=f"SendGrid signature refused: {verdict.refusal}")
    try:
        batch = parse_batch(body)
    except BadBatch as exc:
        abort(400, description=str(exc))
    counts = {"applied": 0, "duplicates": 0, "unknown_message": 0, "unusable": 0}
    for event in batch:
        counts[_apply(event)] += 1
        metrics.provider_callback(Channel.EMAIL, event.event)
    db.session.commit()
    if counts["unknown_message"] or counts["unusable"]:
        log.info("SendGrid batch: %(applied)d applied, %(duplicates)d repeated, %(unknown_message)d about "
                 "emails we do not know, %(unusable)d unusable", counts)
    return jsonify(counts)


def _apply(event: EmailEvent) -> str:
    """Store one event once and apply it; which count it adds to."""
    if not event.usable:
        return "unusable"
    message = db.session.get(Message, event.message_id) if event.message_id and len(event.message_id) <= 32 else None
    if message is not None and message.channel != Channel.EMAIL:
        message = None
    if not _store_once(event, message):
        return "duplicates"
    if message is not None and event.status is not None:
        raise_status(message.id, event.status, None, event.reason if event.status.rank >= 6 else None)
    if message is not None and message.provider_message_id is None and event.sg_message_id:
        # SendGrid had it, though our send never heard its 202 (a lost answer): this event is the
        # proof, so the message is settled here and never sent again (invariant 2).
        db.session.execute(sa.update(Message).where(Message.id == message.id).values(
            provider_message_id=event.sg_message_id.split(".", 1)[0][:128], unsure_since=None,
            next_attempt_at=None, sent_at=sa.func.coalesce(Message.sent_at, utcnow()))
            .execution_options(synchronize_session=False))
    if event.opt_out:
        contact = db.session.get(Contact, message.contact_id) if message is not None else None
        if contact is None and event.email:
            contact = db.session.scalar(sa.select(Contact).where(Contact.email == event.email.strip().lower()))
        if contact is not None:
            change_email_consent(contact, Consent.OPTED_OUT, source=f"sendgrid_{event.event}")
    return "applied" if message is not None or event.opt_out else "unknown_message"


def _store_once(event: EmailEvent, message: Message | None) -> bool:
    """Insert the event unless its sg_event_id is stored already (one statement, no race)."""
    insert = pg_insert if db.engine.dialect.name == "postgresql" else sqlite_insert
    values: dict[str, Any] = {
        "sg_event_id": event.sg_event_id[:100], "message_id": message.id if message else None,
        "event": event.event[:32], "reason": event.reason, "occurred_at": event.timestamp,
        "payload": {"event": event.event, "sg_message_id": event.sg_message_id, "smtp_status": event.smtp_status,
                    "bounce_type": event.bounce_type},
        "received_at": utcnow(),
    }
    statement = (insert(StoredEmailEvent).values(**values).on_conflict_do_nothing(index_elements=["sg_event_id"])
                 .returning(StoredEmailEvent.id))  # a row back means it was new (rowcount is -1 on psycopg)
    return db.session.execute(statement).first() is not None


UNSUBSCRIBE_PAGE = """<!doctype html><html lang="en"><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Unsubscribe</title>
<body style="font-family: sans-serif; max-width: 30rem; margin: 3rem auto; padding: 0 1rem">
{% if done %}<h1>You are unsubscribed</h1><p>No more emails will be sent to this address.
WhatsApp messages, if any, are not affected.</p>
{% else %}<h1>Unsubscribe from these emails?</h1>
<form method="post"><button type="submit" style="font-size: 1.2rem; padding: .5rem 1rem">Unsubscribe</button></form>
{% endif %}</body></html>"""


@bp.route("/unsubscribe/<token>", methods=["GET", "POST"])
def unsubscribe(token: str):
    """RFC 8058 one-click unsubscribe: POST opts the address out of email; GET shows the button."""
    contact = _token_contact(token)
    if request.method == "GET":
        return render_template_string(UNSUBSCRIBE_PAGE, done=contact.email_consent == Consent.OPTED_OUT)
    change_email_consent(contact, Consent.OPTED_OUT, source="list_unsubscribe")
    db.session.commit()
    if request.accept_mimetypes.best == "text/html":
        return render_template_string(UNSUBSCRIBE_PAGE, done=True)
    return jsonify(unsubscribed=True)


def _token_contact(token: str) -> Contact:
    """The contact a genuine link was made for; 404 for a forged, altered or outdated one."""
    read = read_token(token, secret_key=current_app.secret_key or "")
    contact = db.session.get(Contact, read.contact_id) if read is not None and str(read.contact_id).isdigit() else None
    if contact is None or not read.matches(contact.email, current_app.secret_key or ""):
        abort(404, description="this unsubscribe link is not valid")
    return contact
