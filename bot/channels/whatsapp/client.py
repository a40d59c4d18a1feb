"""The official Twilio SDK client, configured once per app, always with a timeout."""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
    from twilio.rest import Client

    http_client = _lean_http_client_class()(timeout=timeout)
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=connections)
    for scheme in ("https://", "http://"):  # http: a local simulator
        http_client.session.mount(scheme, adapter)
    client = Client(account_sid, auth_token, http_client=http_client)
    # Messages live on the 'api' domain; pointing its base URL elsewhere keeps every path and
    # form field exactly as the SDK writes them.
    client.api.base_url = api_url.rstrip("/")
    return client


@functools.cache
def _lean_http_client_class() -> type:
    """The SDK's own HTTP client (`TwilioHttpClient`), minus two costs it pays on every request.

    `requests` reads the proxy and CA-bundle variables out of the whole environment for each
    request it sends (`Session.merge_environment_settings`: a third of the SDK's CPU per send,
    bench/THROUGHPUT.md, "The worker's hot path"); here they are read once per host and kept, so
    HTTPS_PROXY, NO_PROXY and REQUESTS_CA_BUNDLE still apply, as set when the worker started. And
    the SDK formats its request and response log lines (headers included) before the logger
    drops them: here they are only formatted when its logger would write them. Everything else,
    from the URL and form to the answer's parsing, is the SDK's.
    """
    from requests import Request
    from twilio.http.http_client import TwilioHttpClient
    from twilio.http.response import Response

    class LeanTwilioHttpClient(TwilioHttpClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._environment: dict[str, dict[str, Any]] = {}

        def request(self, method: str, url: str, params: Any = None, data: Any = None, headers: Any = None,
                    auth: Any = None, timeout: float | None = None, allow_redirects: bool = False) -> Response:
            if timeout is None:
                timeout = self.timeout
            elif timeout <= 0:
                raise ValueError(timeout)
            kwargs = {"method": method.upper(), "url": url, "params": params, "headers": headers, "auth": auth,
                      "hooks": self.request_hooks}
            if headers and headers.get("Content-Type") in ("application/json", "application/scim+json"):
                kwargs["json"] = data
            else:
                kwargs["data"] = data
            logs = self.logger.isEnabledFor(logging.INFO)
            if logs:
                self.log_request(kwargs)
            prepared = self.session.prepare_request(Request(**kwargs))
            host = urlsplit(prepared.url)[:2]
            settings = self._environment.get(host)
            if settings is None:
                settings = self._environment.setdefault(host, self.session.merge_environment_settings(
                    prepared.url, self.proxy, None, None, None))
            response = self.session.send(prepared, allow_redirects=allow_redirects, timeout=timeout, **settings)
            if logs:
                self.log_response(response.status_code, response)
            return Response(int(response.status_code), response.text, response.headers)

    return LeanTwilioHttpClient


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
