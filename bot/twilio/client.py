"""The official Twilio SDK client, configured once per app, always with a timeout."""
from __future__ import annotations

import logging

from flask import Flask, current_app
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client


def init_app(app: Flask) -> None:
    """Create the app's Twilio client lazily (see get_client); quiet the SDK's request logging."""
    # The SDK logs every request and response at INFO; that is noise in a worker's log.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
    app.extensions["twilio_client"] = None


def build_client(account_sid: str, auth_token: str, api_url: str, timeout: float) -> Client:
    """A Client whose HTTP calls time out and go to `api_url` (Twilio, or a local simulator)."""
    client = Client(account_sid, auth_token, http_client=TwilioHttpClient(timeout=timeout))
    # Messages live on the 'api' domain; pointing its base URL elsewhere keeps every path and
    # form field exactly as the SDK writes them.
    client.api.base_url = api_url.rstrip("/")
    return client


def get_client() -> Client:
    """The current app's Twilio client, created on first use."""
    client = current_app.extensions.get("twilio_client")
    if client is None:
        cfg = current_app.config
        client = build_client(
            cfg["TWILIO_ACCOUNT_SID"], cfg["TWILIO_AUTH_TOKEN"], cfg["TWILIO_API_URL"], cfg["TWILIO_TIMEOUT"]
        )
        current_app.extensions["twilio_client"] = client
    return client
