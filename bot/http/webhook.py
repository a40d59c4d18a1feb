"""POST /twilio/webhook: one signed URL for inbound messages and status callbacks alike."""
from __future__ import annotations

import re

from flask import Blueprint, Response, current_app, jsonify, request

from bot.conversations.inbound import store_inbound
from bot.phone import InvalidNumber
from bot.http.auth import validate_twilio_request
from bot.delivery.statuses import record_callback
from bot.vocabulary import INBOUND_CALLBACK_STATUSES, parse_outbound_status

bp = Blueprint("webhook", __name__)

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
#: A Message SID: two letters (SM, MM) and 32 hex digits.
SID_PATTERN = re.compile(r"[A-Z]{2}[0-9a-f]{32}\Z")  # \Z, not $: "$" lets a trailing newline through
MAX_STATUS_LENGTH = 32


def form_fields() -> dict[str, str]:
    """The request's form as a plain dict, without NUL characters (no database text holds them;
    Twilio never sends them, but a 500 is never the answer)."""
    return {key: value.replace("\x00", "") for key, value in request.form.items()}


def twiml_ok() -> Response:
    """An empty TwiML answer: Twilio logs nothing and sends nothing back on its own."""
    return Response(EMPTY_TWIML, status=200, mimetype="text/xml")


@bp.post("/twilio/webhook")
@validate_twilio_request
def twilio_webhook():
    """Record a status callback, or store and enqueue an inbound message; answer in milliseconds."""
    form = request.form
    if not form.get("MessageSid"):
        return jsonify(error="MessageSid is required"), 400
    if not SID_PATTERN.match(form["MessageSid"]):
        return jsonify(error="MessageSid is not a Twilio message SID (SM/MM + 32 hex digits)"), 400
    if form.get("MessageStatus"):
        return _status_callback()
    return _inbound_message()


def _status_callback():
    status = request.form["MessageStatus"].strip().lower()
    if status in INBOUND_CALLBACK_STATUSES:
        return twiml_ok()
    if len(status) > MAX_STATUS_LENGTH:
        return jsonify(error=f"MessageStatus longer than {MAX_STATUS_LENGTH} characters"), 400
    if parse_outbound_status(status) is None:
        # Twilio adds statuses without notice; keep the event, never fail the callback.
        current_app.logger.warning("unknown MessageStatus %r kept as an event", status)
    record_callback(form_fields())
    return twiml_ok()


def _inbound_message():
    if not request.form.get("From"):
        return jsonify(error="From is required"), 400
    try:
        store_inbound(form_fields())  # its processing is enqueued once it is committed
    except InvalidNumber as exc:
        return jsonify(error=f"From {exc}"), 400
    return twiml_ok()
