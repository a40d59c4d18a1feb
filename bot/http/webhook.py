"""POST /twilio/webhook: one signed URL for inbound messages and status callbacks alike."""
from __future__ import annotations

import re
from typing import Callable, Mapping

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import MultiDict

from bot.channels.whatsapp.callbacks import parse_status_callback
from bot.conversations.inbound import store_inbound
from bot.delivery import webhook_fallback
from bot.phone import InvalidNumber
from bot.http.auth import twilio_form, validate_twilio_request
from bot.delivery.statuses import record_callback
from bot.metrics import counters as metrics
from bot.vocabulary import INBOUND_CALLBACK_STATUSES, Channel, parse_outbound_status

bp = Blueprint("webhook", __name__)

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
#: A Message SID: two letters (SM, MM) and 32 hex digits.
SID_PATTERN = re.compile(r"[A-Z]{2}[0-9a-f]{32}\Z")  # \Z, not $: "$" lets a trailing newline through
MAX_STATUS_LENGTH = 32
#: Seconds a client is asked to wait when neither the database nor the queue can take a webhook.
RETRY_AFTER_SECONDS = 5


def form_fields() -> dict[str, str]:
    """The request's form (parsed once: `twilio_form`) as a plain dict, without NUL characters (no
    database text holds them; Twilio never sends them, but a 500 is never the answer)."""
    return {key: value.replace("\x00", "") for key, value in twilio_form().items()}


def twiml_ok() -> Response:
    """An empty TwiML answer: Twilio logs nothing and sends nothing back on its own."""
    return Response(EMPTY_TWIML, status=200, mimetype="text/xml")


@bp.post("/twilio/webhook")
@validate_twilio_request
def twilio_webhook():
    """Record a status callback, or store and enqueue an inbound message; answer in milliseconds."""
    form = twilio_form()
    if not form.get("MessageSid"):
        return jsonify(error="MessageSid is required"), 400
    if not SID_PATTERN.match(form["MessageSid"]):
        return jsonify(error="MessageSid is not a Twilio message SID (SM/MM + 32 hex digits)"), 400
    if form.get("MessageStatus"):
        return _status_callback(form)
    return _inbound_message(form)


def _status_callback(form: MultiDict[str, str]):
    status = form["MessageStatus"].strip().lower()
    if status in INBOUND_CALLBACK_STATUSES:
        return twiml_ok()
    if len(status) > MAX_STATUS_LENGTH:
        return jsonify(error=f"MessageStatus longer than {MAX_STATUS_LENGTH} characters"), 400
    if parse_outbound_status(status) is None:
        # Twilio adds statuses without notice; keep the event, never fail the callback.
        current_app.logger.warning("unknown MessageStatus %r kept as an event", status)
    metrics.provider_callback(Channel.WHATSAPP, status, form.get("ErrorCode"))
    return _store_or_queue(lambda form: record_callback(parse_status_callback(form)), form_fields())


def _inbound_message(form: MultiDict[str, str]):
    if not form.get("From"):
        return jsonify(error="From is required"), 400
    try:
        # Its processing is enqueued once it is committed. The number is parsed before any query,
        # so a bad From is a 400 even with the database down.
        return _store_or_queue(store_inbound, form_fields())
    except InvalidNumber as exc:
        return jsonify(error=f"From {exc}"), 400


def _store_or_queue(store: Callable[[Mapping[str, str]], object], form: dict[str, str]):
    """Store the webhook now; with the database unreachable, hand it to the queue for the worker
    to store later, and acknowledge it either way (invariant 11). Only when the queue cannot take
    it either is the answer a 503, which Twilio retries if the URL's overrides ask for it
    (`#rp=5xx`, README)."""
    try:
        store(form)
        return twiml_ok()
    except SQLAlchemyError as exc:
        if not webhook_fallback.database_unavailable(exc):
            raise
        # The exception text may name the database host; its kind is enough here.
        error = type(exc).__name__
    webhook_fallback.forget_failed_session()
    if webhook_fallback.hand_to_queue(form):
        current_app.logger.warning("database unavailable (%s): webhook %s queued for the worker to store",
                                   error, form["MessageSid"])
        return twiml_ok()
    current_app.logger.error("database (%s) and queue both unavailable: webhook %s refused with 503",
                             error, form["MessageSid"])
    response = jsonify(error="temporarily unavailable: the database and the queue are both down; retry later")
    response.status_code = 503
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
