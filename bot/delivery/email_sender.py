"""The email leg of a send batch: the same claims, lease, retries and per-contact order as
WhatsApp (bot.delivery.sender), SendGrid through bot.channels.email.

Registered by the tasks module (the composition root) as the sender for `Channel.EMAIL`, so
sender.py names no email provider. SendGrid offers no lookup by our id, so "may have been
accepted" (invariant 2) is settled by SendGrid's own events instead (docs/ARCHITECTURE.md,
"Email: when a send's fate is unknown"): every email carries our message id in `custom_args`,
and an event naming it proves SendGrid took it. Until one arrives, or for EMAIL_UNSURE_GRACE_SECONDS
after the attempt, the message waits; after that it is sent again — the one duplicate email
still possible, and only when SendGrid took the first attempt but no event of it reached us.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import current_app
from jinja2 import TemplateError

from bot.channels.email.client import build_client
from bot.channels.email.copy import render_email
from bot.channels.email.mail import InvalidMail, build_mail
from bot.channels.email.sending import send
from bot.channels.email.unsubscribe import make_token
from bot.channels.outcomes import Accepted, Failed
from bot.clock import utcnow
from bot.delivery import in_flight
from bot.delivery.rate_limit import SendRateLimit
from bot.delivery.sender import Outcome, _failed_attempt, _release, concurrency, finish, load_recipients, release_next
from bot.delivery.shutdown import is_stopping
from bot.delivery.statuses import report_statuses
from bot.extensions import db
from bot.models import Contact, EmailEvent, Message
from bot.twilio.errors import OPTED_OUT_CODE
from bot.vocabulary import Consent, MessageStatus

log = logging.getLogger(__name__)

#: SendGrid's 401 (a bad key, or "Maximum credits exceeded"): the account, not the message, is
#: at fault; the message is held and tried this often, never failed for it.
HOLD_DELAY = timedelta(minutes=5)
#: Worker threads build the email limiter once between them (two budgets would each allow the rate).
_limit_lock = threading.Lock()


class _Stopping(Exception):
    """The worker is stopping: this email's call did not start (it goes back to the queue)."""


def email_rate_limit() -> SendRateLimit:
    """The email sender's own budget, EMAIL_MESSAGES_PER_SECOND, shared by every worker through
    the queue's Redis as WhatsApp's is (invariant 10). Not `send_rate_limit()`: that one is sized
    by TWILIO_MESSAGES_PER_SECOND, which said nothing of SendGrid (found by
    tests/test_email_outages.py, the rate-slot twin: a 2-a-second email sender sent at 80/s)."""
    limit = current_app.extensions.get("email_rate_limit")
    if limit is None:
        with _limit_lock:
            limit = current_app.extensions.get("email_rate_limit")
            if limit is None:
                cfg = current_app.config
                limit = SendRateLimit(per_second=int(cfg.get("EMAIL_MESSAGES_PER_SECOND") or 100),
                                      storage_uri=cfg.get("REDIS_URL") or "memory://",
                                      namespace=f"{cfg.get('QUEUE_NAME') or 'whatsapp-bot'}:email-rate")
                current_app.extensions["email_rate_limit"] = limit
    return limit


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


def build(row: sa.Row, contact: Contact) -> dict[str, Any]:
    """The v3 mail body of one message: its template's email copy, or its subject and text."""
    if row.template:
        copy = render_email(row.template, {"name": contact.name, **(row.variables or {})},
                            business=current_app.config.get("BOT_NAME", "us"))
        subject, text, html = row.subject or copy.subject, copy.text, copy.html
    else:
        subject, text, html = row.subject or "", row.body or "", None
    token = make_token(contact.id, contact.email, secret_key=current_app.secret_key)
    return build_mail(message_id=row.id, to_email=contact.email, to_name=contact.name,
                      from_=current_app.config["EMAIL_FROM"], subject=subject, text=text, html=html,
                      unsubscribe_url=f"{public_url()}/unsubscribe/{token}")


def send_emails(batch: list[sa.Row]) -> dict[str, Outcome]:
    """Send claimed email messages at once; record every outcome. By id."""
    outcomes: dict[str, Outcome] = {}
    ready: list[tuple[sa.Row, dict[str, Any]]] = []
    recipients = load_recipients({row.contact_id for row in batch})
    cfg = current_app.config
    for row in batch:
        contact, _ = recipients[row.contact_id]
        refusal = _refusal(contact)
        if refusal is not None:
            finish(row.id, MessageStatus.FAILED, *refusal, row.contact_id)
            outcomes[row.id] = Outcome.REFUSED
            continue
        if row.unsure_since is not None:
            seen = _seen_by_sendgrid(row.id)
            if seen is not None:
                outcomes[row.id] = _record(row, seen)
                continue
            grace = unsure_grace()
            if utcnow() - row.unsure_since < grace:
                outcomes[row.id] = _wait(row, row.unsure_since + grace)
                continue
        try:
            ready.append((row, build(row, contact)))
        except (InvalidMail, LookupError, TemplateError) as exc:  # content that can never become an email
            log.warning("message %s: cannot build the email (%s)", row.id, type(exc).__name__)
            finish(row.id, MessageStatus.FAILED, None, f"cannot build the email: {type(exc).__name__}", row.contact_id)
            outcomes[row.id] = Outcome.FAILED
    if not ready:
        return outcomes
    db.session.close()  # no connection held while waiting for SendGrid (as the WhatsApp leg)
    client = build_client(cfg["SENDGRID_API_KEY"], cfg.get("SENDGRID_API_URL") or "https://api.sendgrid.com",
                          timeout=float(cfg.get("TWILIO_TIMEOUT") or 10))
    limit, sender_key = email_rate_limit(), "email:" + str(cfg.get("EMAIL_FROM"))

    def one(mail: dict[str, Any]) -> Any:
        # As the WhatsApp leg: a worker told to stop starts no new call, and a call waiting for a
        # rate slot stops waiting (bot/delivery/shutdown.py); those emails go back to the queue.
        # (Found by tests/test_email_faults.py's SIGTERM mid-batch twin: without it a stopping
        # worker kept sending its whole batch for as long as the rate limit made it wait.)
        if is_stopping():
            raise _Stopping()
        started = utcnow()
        if not limit.acquire(sender_key, cancelled=is_stopping):
            if is_stopping():
                raise _Stopping()
            return Failed(None, "the email rate limit stayed full", retry=True)
        return send(client, mail, started)

    calls = in_flight.call_all(one, [{"mail": mail} for _, mail in ready], concurrency())
    for (row, _), call in zip(ready, calls):
        if isinstance(call.error, _Stopping):
            outcomes[row.id] = _release(row)
            continue
        result = call.result if call.error is None else Failed(None, f"unexpected {type(call.error).__name__}",
                                                               retry=True)
        if isinstance(result, Accepted):
            outcomes[row.id] = _record(row, result.provider_id)
        elif isinstance(result, Failed) and result.hold:
            outcomes[row.id] = _hold(row, result)
        elif isinstance(result, Failed):
            outcomes[row.id] = _failed_attempt(row, result.http_status, result.code, result.text,
                                               transient=result.retry)
        else:  # Unknown: SendGrid may have it; its events will say
            outcomes[row.id] = _failed_attempt(row, result.http_status, None, result.reason, transient=True,
                                               unsure_since=result.since)
    return outcomes


def _refusal(contact: Contact) -> tuple[int | None, str] | None:
    if not current_app.config.get("SENDGRID_API_KEY"):
        return None, "email is not configured (SENDGRID_API_KEY); not sent"
    if not contact.email:
        return None, "the user has no email address; not sent"
    if contact.email_consent == Consent.OPTED_OUT:
        return OPTED_OUT_CODE, "Recipient has unsubscribed from email; not sent."
    return None


def _seen_by_sendgrid(message_id: str) -> str | None:
    """SendGrid's id of this message if any of its events reached us (then it was accepted)."""
    payload = db.session.scalar(sa.select(EmailEvent.payload).where(EmailEvent.message_id == message_id).limit(1))
    if payload is None:
        return None
    return str((payload or {}).get("sg_message_id") or "").split(".")[0]


def _record(row: sa.Row, provider_id: str) -> Outcome:
    """SendGrid took it: accepted, with its id; the contact's next message may go."""
    db.session.execute(
        sa.update(Message).where(Message.id == row.id)
        .values(provider_message_id=provider_id or None, sent_at=utcnow(), updated_at=utcnow(), claimed_until=None,
                unsure_since=None, next_attempt_at=None, error_code=None, error_message=None,
                status=sa.case((Message.status_rank < MessageStatus.ACCEPTED.rank, MessageStatus.ACCEPTED.value),
                               else_=Message.status),
                status_rank=sa.case((Message.status_rank < MessageStatus.ACCEPTED.rank, MessageStatus.ACCEPTED.rank),
                                    else_=Message.status_rank))
        .execution_options(synchronize_session=False))
    report_statuses({row.id: MessageStatus.ACCEPTED})
    db.session.commit()
    release_next(row.id, row.contact_id)
    return Outcome.SENT


def _wait(row: sa.Row, until: datetime) -> Outcome:
    """Not sent: wait for SendGrid's events about the earlier attempt until `until`."""
    db.session.execute(
        sa.update(Message).where(Message.id == row.id, Message.status == MessageStatus.DISPATCHING)
        .values(status=MessageStatus.RETRYING, claimed_until=None, next_attempt_at=until,
                attempts=Message.attempts - 1).execution_options(synchronize_session=False))
    db.session.commit()
    return Outcome.RETRY


def _hold(row: sa.Row, result: Failed) -> Outcome:
    """The account is at fault (401): keep the message, try again later, never count it."""
    log.error("SendGrid refused the account (HTTP %s: %s); emails are held until it is fixed",
              result.http_status, result.text)
    db.session.execute(
        sa.update(Message).where(Message.id == row.id, Message.status == MessageStatus.DISPATCHING)
        .values(status=MessageStatus.RETRYING, claimed_until=None, next_attempt_at=utcnow() + HOLD_DELAY,
                attempts=Message.attempts - 1, error_code=result.code,
                error_message=f"held: {result.text}"[:1000]).execution_options(synchronize_session=False))
    db.session.commit()
    return Outcome.RETRY
