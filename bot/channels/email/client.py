"""The official SendGrid SDK's client, pointed at SENDGRID_API_URL, always with a timeout.

`SendGridAPIClient.send()` passes no timeout, and its HTTP client (`python_http_client`, urllib)
then waits forever for an answer that never comes. `python_http_client.Client` takes a `timeout`
(its constructor argument; copied onto every child client that `client.mail.send` builds, and
used by `_make_request` when the call passes none), so setting it once on the SDK's client makes
`.send()` and `client.mail.send.post()` both time out (checked in sendgrid 6.12.5 /
python-http-client 3.3.7 sources; tests/channels/test_email_channel.py proves it against a simulator that
hangs). urllib's timeout bounds the connect and each socket read, not the whole exchange.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sendgrid import SendGridAPIClient

#: SendGrid's API; SENDGRID_API_URL points the client elsewhere (the simulator in development).
DEFAULT_API_URL = "https://api.sendgrid.com"
#: Seconds per call (connect, then each read). Like TWILIO_TIMEOUT, at most 10: a send on the wire
#: when the worker is told to stop must end inside its shutdown timeout.
DEFAULT_TIMEOUT = 10.0


def build_client(api_key: str, api_url: str = DEFAULT_API_URL, timeout: float = DEFAULT_TIMEOUT) -> "SendGridAPIClient":
    """A SendGridAPIClient whose calls go to `api_url` (SendGrid, or a local simulator) and time
    out after `timeout` seconds.

    The SDK opens a new connection per request (urllib, no pool), so one client is safe to share
    between threads: its only shared state is the default headers, which every call merges into
    with the same values.
    """
    if timeout <= 0:
        raise ValueError("timeout must be > 0 seconds")
    # Imported here, as the Twilio SDK is (bot/channels/whatsapp/client.py): only the worker sends.
    from sendgrid import SendGridAPIClient

    # python_http_client logs every request at DEBUG with its headers (the API key) and its
    # payload (the recipient's address): never in our logs, whatever the root level.
    logging.getLogger("python_http_client").setLevel(logging.WARNING)

    client = SendGridAPIClient(api_key, host=api_url.rstrip("/"))
    # The SDK builds its python_http_client.Client in the constructor with timeout=None; its
    # `timeout` attribute is what every request built from it inherits (see the module docstring).
    client.client.timeout = timeout
    return client
