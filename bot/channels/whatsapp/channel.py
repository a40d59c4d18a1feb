"""WhatsApp through Twilio, behind the channel interface (bot/channels/base.py).

Where each Twilio fact lives: the client (`client.py`), which errors retry (`errors.py`), the
window and sizes (`whatsapp.py`), one send and its answer (`sending.py`), the lookup of a send
whose answer was lost (`lookup.py`), the status callbacks (`callbacks.py`). This module ties them
to the sender: the refusals before Twilio is called and the `messages.create` arguments
(docs/ARCHITECTURE.md, "The channel seam").
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

import sqlalchemy as sa
from flask import current_app

from bot.channels.base import LookupAnswer, Refusal
from bot.channels.outcomes import Outcome
from bot.channels.whatsapp import lookup, sending
from bot.channels.whatsapp.client import get_client
from bot.channels.whatsapp.errors import OPTED_OUT_CODE, OUTSIDE_WINDOW_CODE
from bot.channels.whatsapp.whatsapp import within_window
from bot.models import Contact, Message
from bot.vocabulary import Channel, Consent, Kind


def refusal_reason(message: Message | sa.Row, contact: Contact, stop_waiting: bool) -> tuple[int, str] | None:
    """Why this message must not reach Twilio now (opt-out, 24-hour window), or None.

    `stop_waiting`: the contact has sent an opt-out the engine has not handled yet (see
    bot.contacts.opt_out_waiting).
    """
    if message.kind != Kind.OPT_OUT_CONFIRMATION:
        if contact.consent == Consent.OPTED_OUT:
            return OPTED_OUT_CODE, "Recipient has opted out; not sent."
        if stop_waiting:
            # Their STOP is stored but not yet handled by the engine: it is an opt-out all the same.
            return OPTED_OUT_CODE, "Recipient has sent an opt-out (not yet processed); not sent."
    if message.content_sid is None and not within_window(contact.last_inbound_at):
        return OUTSIDE_WINDOW_CODE, "Outside the 24-hour window and no template; not sent."
    return None


def twilio_params(message: Message | sa.Row, contact: Contact) -> dict:
    """The keyword arguments of client.messages.create() for this message."""
    cfg = current_app.config
    params: dict = {"to": contact.whatsapp_address, "from_": cfg["TWILIO_WHATSAPP_NUMBER"]}
    if message.content_sid:
        params["content_sid"] = message.content_sid
        if message.variables:
            params["content_variables"] = json.dumps(message.variables)
    else:
        if message.body:
            params["body"] = message.body
        if message.media_urls:
            params["media_url"] = list(message.media_urls)
    if cfg.get("TWILIO_WEBHOOK_URL"):
        params["status_callback"] = cfg["TWILIO_WEBHOOK_URL"]
    return params


class WhatsAppChannel:
    """Twilio's Programmable Messaging, WhatsApp sender (TWILIO_WHATSAPP_NUMBER)."""

    name = Channel.WHATSAPP.value
    provider_id_column = "twilio_sid"
    #: Twilio's status callbacks name the SID, and can beat the send that records it.
    callbacks_by_provider_id = True
    #: `messages.list` answers at once: a lost answer is settled in the same batch.
    looks_up_at_once = True

    def rate_key(self) -> str:
        """One budget per WhatsApp sender number (Twilio's limits are per sender)."""
        return str(current_app.config["TWILIO_WHATSAPP_NUMBER"])

    def rate_per_second(self) -> int:
        """TWILIO_MESSAGES_PER_SECOND: the sender's allowed rate (80 by default)."""
        return int(current_app.config["TWILIO_MESSAGES_PER_SECOND"])

    def prepare(self, message: Any, contact: Contact, stop_waiting: bool) -> dict | Refusal:
        """The create() arguments, or the refusal (opt-out, a STOP waiting, the 24-hour window)."""
        refusal = refusal_reason(message, contact, stop_waiting)
        if refusal is not None:
            return Refusal(*refusal)
        return twilio_params(message, contact)

    def open_sender(self) -> Callable[[dict, datetime], Outcome]:
        """`messages.create` on this app's client (read once per batch: tests swap it)."""
        client = get_client()
        return lambda params, started: sending.send(client, params, started)

    def open_lookup(self) -> Callable[[dict], Any]:
        """`messages.list` of the recipient's recent messages from our sender."""
        client = get_client()
        return lambda params: lookup.recent_sends(client, params)

    def match(self, message: Any, request: dict, fetched: Any, since: datetime, exclude: set[str]) -> LookupAnswer:
        """Twilio's message that is this send (see lookup.match_accepted_send), or None."""
        return lookup.match_accepted_send(message, request, fetched, since, exclude)
