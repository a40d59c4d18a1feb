"""The official Twilio SDK client, configured once per app, always with a timeout."""
from __future__ import annotations

import logging

from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:
    from twilio.rest import Client

#: Keep-alive connections to Twilio per process when nothing says how many threads share the client.
DEFAULT_CONNECTIONS = 10


def init_app(app: Flask) -> None:
    """Create the app's Twilio client lazily (see get_client); quiet the SDK's request logging."""
    # The SDK logs every request and response at INFO; that is noise in a worker's log.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
    app.extensions["twilio_client"] = None


def build_client(account_sid: str, auth_token: str, api_url: str, timeout: float,
                 connections: int = DEFAULT_CONNECTIONS) -> "Client":
    """A Client whose HTTP calls time out and go to `api_url` (Twilio, or a local simulator).

    `connections`: how many keep-alive connections it keeps — one per thread that sends at once.
    The SDK's own pool keeps at most 32 (https only); every send beyond the pool would open a new
    TCP and TLS connection and throw it away afterwards.
    """
    # Imported here: only the worker (and the doctor) call Twilio's REST API; a web process
    # that never does is 6 MB smaller without it, and without requests (bench/THROUGHPUT.md,
    # "The web's hot path").
    from requests.adapters import HTTPAdapter
    from twilio.http.http_client import TwilioHttpClient
    from twilio.rest import Client

    http_client = TwilioHttpClient(timeout=timeout)
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=connections)
    for scheme in ("https://", "http://"):  # http: a local simulator
        http_client.session.mount(scheme, adapter)
    client = Client(account_sid, auth_token, http_client=http_client)
    # Messages live on the 'api' domain; pointing its base URL elsewhere keeps every path and
    # form field exactly as the SDK writes them.
    client.api.base_url = api_url.rstrip("/")
    return client


def get_client() -> "Client":
    """The current app's Twilio client, created on first use."""
    client = current_app.extensions.get("twilio_client")
    if client is None:
        cfg = current_app.config
        client = build_client(
            cfg["TWILIO_ACCOUNT_SID"], cfg["TWILIO_AUTH_TOKEN"], cfg["TWILIO_API_URL"], cfg["TWILIO_TIMEOUT"],
            connections=int(cfg["SEND_CONCURRENCY"]),
        )
        current_app.extensions["twilio_client"] = client
    return client
