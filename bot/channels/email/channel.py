"""Email through SendGrid, behind the channel interface (bot/channels/base.py).

The pieces are this package's pure modules (the mail, one send, the events, the unsubscribe
token); this module ties them to the sender with the app's configuration and the database.

SendGrid offers no lookup by our id, so "may have been accepted" (invariant 2) is settled by
SendGrid's own events instead (docs/ARCHITECTURE.md, "Email: when a send's fate is unknown"):
every email carries our message id in `custom_args`, and an event naming it (stored in
`email_events` by bot/http/email_hooks.py) proves SendGrid took it. Until one arrives, or for
EMAIL_UNSURE_GRACE_SECONDS after the attempt, the message waits; after that it is sent again —
the one duplicate email still possible, and only when SendGrid took the first attempt but no
event of it reached us.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Callable
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import current_app
from jinja2 import TemplateError

from bot.channels.base import LookupAnswer, Refusal, Wait
from bot.channels.email.client import build_client
from bot.channels.email.copy import render_email
from bot.channels.email.mail import InvalidMail, build_mail
from bot.channels.email.sending import send
from bot.channels.email.unsubscribe import make_token
from bot.channels.outcomes import Accepted, Failed, Outcome
from bot.channels.whatsapp.errors import OPTED_OUT_CODE
from bot.clock import utcnow
from bot.extensions import db
from bot.models import Contact, EmailEvent
from bot.vocabulary import Channel, Consent, MessageStatus

log = logging.getLogger(__name__)


def unsure_grace() -> timedelta:
    """How long an email whose send may have been accepted waits for SendGrid's first event about
    it (`processed` arrives within seconds) before it is sent again (EMAIL_UNSURE_GRACE_SECONDS)."""
    return timedelta(seconds=float(current_app.config.get("EMAIL_UNSURE_GRACE_SECONDS") or 600))


def public_url() -> str:
    """The server's public base URL for links in emails: PUBLIC_URL, else TWILIO_WEBHOOK_URL's origin."""
    cfg = current_app.config
    if cfg.get("PUBLIC_URL"):
        return cfg["PUBLIC_URL"].rstrip("/")
    parts = urlsplit(cfg.get("TWILIO_WEBHOOK_URL") or "http://127.0.0.1:5000/")
    return f"{parts.scheme}://{parts.netloc}"


def build(row: Any, contact: Contact) -> dict[str, Any]:
    """The v3 mail body of one message: its template's email copy, or its subject and text."""
    if row.template:
        # The locale fixed when the message was made chooses the copy, not the contact's now
        # (docs/ARCHITECTURE.md, "Languages"); a row made before it was stored: the contact's.
        locale = row.locale if row.locale is not None else contact.locale
        copy = render_email(row.template, {"name": contact.name, **(row.variables or {})},
                            business=current_app.config.get("BOT_NAME", "us"), locale=locale)
        subject, text, html = row.subject or copy.subject, copy.text, copy.html
    else:
        subject, text, html = row.subject or "", row.body or "", None
    token = make_token(contact.id, contact.email, secret_key=current_app.secret_key)
    return build_mail(message_id=row.id, to_email=contact.email, to_name=contact.name,
                      from_=current_app.config["EMAIL_FROM"], subject=subject, text=text, html=html,
                      unsubscribe_url=f"{public_url()}/unsubscribe/{token}")


def refusal(contact: Contact) -> Refusal | None:
    """Why no email may go to this contact now (not configured, no address, unsubscribed), or None."""
    if not current_app.config.get("SENDGRID_API_KEY"):
        return Refusal(None, "email is not configured (SENDGRID_API_KEY); not sent")
    if not contact.email:
        return Refusal(None, "the user has no email address; not sent")
    if contact.email_consent == Consent.OPTED_OUT:
        return Refusal(OPTED_OUT_CODE, "Recipient has unsubscribed from email; not sent.")
    return None


def seen_by_sendgrid(message_id: str) -> str | None:
    """SendGrid's id of this message if any of its events reached us (then it was accepted)."""
    payload = db.session.scalar(sa.select(EmailEvent.payload).where(EmailEvent.message_id == message_id).limit(1))
    db.session.commit()
    if payload is None:
        return None
    return str((payload or {}).get("sg_message_id") or "").split(".")[0]


class EmailChannel:
    """SendGrid's v3 Mail Send, from EMAIL_FROM."""

    name = Channel.EMAIL.value
    provider_id_column = "provider_message_id"
    #: SendGrid's events name our message id (custom_args): they never wait for the send's record.
    callbacks_by_provider_id = False
    #: No lookup to ask: an unknown fate waits for SendGrid's events before the next attempt.
    looks_up_at_once = False

    def rate_key(self) -> str:
        """One budget per sending address, apart from every WhatsApp sender's."""
        return "email:" + str(current_app.config.get("EMAIL_FROM"))

    def rate_per_second(self) -> int:
        """EMAIL_MESSAGES_PER_SECOND: SendGrid's pace, never Twilio's."""
        return int(current_app.config.get("EMAIL_MESSAGES_PER_SECOND") or 100)

    def prepare(self, message: Any, contact: Contact, stop_waiting: bool) -> dict[str, Any] | Refusal:
        """The v3 mail body, or why not. A STOP on WhatsApp (`stop_waiting`) says nothing of email
        (invariant 14)."""
        refused = refusal(contact)
        if refused is not None:
            return refused
        try:
            return build(message, contact)
        except (InvalidMail, LookupError, TemplateError) as exc:  # content that can never become an email
            log.warning("message %s: cannot build the email (%s)", message.id, type(exc).__name__)
            return Refusal(None, f"cannot build the email: {type(exc).__name__}")

    def open_sender(self) -> Callable[[dict, datetime], Outcome]:
        """`/v3/mail/send` through the SDK, with the send timeout (one client per batch)."""
        cfg = current_app.config
        client = build_client(cfg["SENDGRID_API_KEY"], cfg.get("SENDGRID_API_URL") or "https://api.sendgrid.com",
                              timeout=float(cfg.get("TWILIO_TIMEOUT") or 10))

        def send_mail(mail: dict, started: datetime) -> Outcome:
            try:
                return send(client, mail, started)
            except Exception as exc:  # a bug building the request: it never left
                log.error("unexpected error sending an email", exc_info=exc)
                return Failed(None, f"unexpected {type(exc).__name__}", retry=True)

        return send_mail

    def open_lookup(self) -> Callable[[dict], Any]:
        """Nothing to fetch: SendGrid's events come to us (`match` reads them)."""
        return lambda mail: None

    def match(self, message: Any, request: dict, fetched: Any, since: datetime, exclude: set[str]) -> LookupAnswer:
        """Accepted if an event of SendGrid's names this message; else wait out the grace period
        after the attempt; after it, None: send again."""
        seen = seen_by_sendgrid(message.id)
        if seen is not None:
            return Accepted(seen, MessageStatus.ACCEPTED.value)
        grace = unsure_grace()
        if utcnow() - since < grace:
            return Wait(since + grace)
        return None
