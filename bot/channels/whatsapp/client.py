"""The official Twilio SDK client, configured once per app, always with a timeout."""
from __future__ import annotations

import base64
import functools
import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode

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

    `connections`: how many keep-alive connections it keeps per host — one per thread that sends
    at once; a send beyond them opens a connection of its own and closes it afterwards.
    """
    # Imported here: only the worker (and the doctor) call Twilio's REST API; a web process
    # that never does is 6 MB smaller without it (bench/THROUGHPUT.md, "The web's hot path").
    from twilio.rest import Client

    client = Client(account_sid, auth_token,
                    http_client=_urllib3_http_client_class()(timeout=timeout, connections=connections))
    # Messages live on the 'api' domain; pointing its base URL elsewhere keeps every path and
    # form field exactly as the SDK writes them.
    client.api.base_url = api_url.rstrip("/")
    return client


@functools.cache
def _urllib3_http_client_class() -> type:
    """The SDK's HTTP client interface (`twilio.http.HttpClient`) on urllib3 directly.

    The SDK builds every request (URL, query, form fields, headers, Basic auth) and reads every
    answer (`twilio.http.response.Response`, its errors: TwilioRestException...); this class only
    carries the bytes. The SDK's own `TwilioHttpClient` goes through `requests`, which costs about
    1.3 ms of CPU per send (`Session.prepare_request`, hooks, cookies, the environment merged
    per request, its adapter: bench/THROUGHPUT.md, "The worker's hot path") for what urllib3 does
    itself: a pool of keep-alive connections per host. docs/libraries.md says why urllib3 and
    what of `requests`' behaviour is kept (proxies, CA bundle, redirects not followed, timeouts).
    """
    import urllib3
    from twilio.http import HttpClient
    from twilio.http.response import Response

    class Urllib3TwilioHttpClient(HttpClient):
        def __init__(self, timeout: float | None = None, connections: int = DEFAULT_CONNECTIONS,
                     logger: logging.Logger = logging.getLogger("twilio.http_client")) -> None:
            super().__init__(logger, False, timeout)
            self.connections = connections
            #: Per (scheme, host, port): the pool manager to send through (direct, or a proxy's).
            self._routes: dict[tuple[str, str, int | None], urllib3.PoolManager] = {}
            self._managers: dict[str | None, urllib3.PoolManager] = {}
            self._lock = threading.Lock()

        def request(self, method: str, url: str, params: Any = None, data: Any = None, headers: Any = None,
                    auth: Any = None, timeout: float | None = None, allow_redirects: bool = False) -> Response:
            """Send one request as the SDK built it; its answer as the SDK's Response. Errors are
            urllib3's own (bot/channels/whatsapp/sending.py classifies them)."""
            if timeout is None:
                timeout = self.timeout
            elif timeout <= 0:
                raise ValueError(timeout)
            method = method.upper()
            if self.logger.isEnabledFor(logging.INFO):
                self.log_request({"method": method, "url": url, "params": params, "headers": headers})
            headers = dict(headers or {})
            if params:
                url += ("&" if "?" in url else "?") + form_encode(params)
            body: bytes | None = None
            if headers.get("Content-Type") in ("application/json", "application/scim+json"):
                if data is not None:
                    body = json.dumps(data, allow_nan=False).encode("utf-8")
            elif isinstance(data, (str, bytes)):
                body = data.encode("utf-8") if isinstance(data, str) else data
            elif data:
                body = form_encode(data).encode("ascii")
                headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            if auth is not None:
                headers["Authorization"] = _basic_auth(*auth)
            parts = urllib3.util.parse_url(url)
            manager = self._routes.get((parts.scheme, parts.host, parts.port))
            if manager is None:
                manager = self._route(url, (parts.scheme, parts.host, parts.port))
            # retries=False: one attempt, its error raised as is (a send is not idempotent: a
            # second attempt is the sender's to decide, after a lookup: docs/ARCHITECTURE.md,
            # "Retries"); redirects are answered, not followed, as the SDK asks of requests.
            answer = manager.request(method, url, body=body, headers={**_default_headers(), **headers},
                                     timeout=urllib3.Timeout(connect=timeout, read=timeout),
                                     retries=False, redirect=allow_redirects)
            if self.logger.isEnabledFor(logging.INFO):
                self.log_response(answer.status, answer)
            return Response(answer.status, _text(answer), answer.headers)

        def _route(self, url: str, key: tuple[str, str, int | None]) -> "urllib3.PoolManager":
            """How to reach this host: through the proxy the environment names for it (HTTPS_PROXY,
            HTTP_PROXY, ALL_PROXY, NO_PROXY: `requests`' own reading of them), or directly; read
            once per host, as the worker started."""
            from requests.utils import get_environ_proxies, select_proxy

            proxy = select_proxy(url, get_environ_proxies(url))
            with self._lock:
                manager = self._managers.get(proxy)
                if manager is None:
                    manager = self._managers[proxy] = _pool_manager(proxy, self.connections)
                self._routes[key] = manager
            return manager

    return Urllib3TwilioHttpClient


@functools.cache
def _default_headers() -> dict[str, str]:
    """What `requests` adds to every request the SDK sends and urllib3 does not: the encodings
    urllib3 can decode here (gzip, deflate; br and zstd when their packages are installed)."""
    import urllib3

    encodings = urllib3.util.make_headers(accept_encoding=True)["accept-encoding"]
    return {"Accept-Encoding": ", ".join(encodings.split(",")), "Accept": "*/*", "Connection": "keep-alive"}


def _pool_manager(proxy: str | None, connections: int) -> Any:
    """Keep-alive pools of `connections` per host, verifying certificates against the bundle
    `requests` would use: REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE if set, else certifi's."""
    import certifi
    import urllib3

    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    tls["ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"] = bundle
    # block=False: a send beyond the pool opens a connection of its own rather than waiting.
    options = {"num_pools": 4, "maxsize": max(1, connections), "block": False, **tls}
    if proxy is None:
        return urllib3.PoolManager(**options)
    parsed = urllib3.util.parse_url(proxy)
    proxy_headers = urllib3.util.make_headers(proxy_basic_auth=unquote(parsed.auth)) if parsed.auth else None
    return urllib3.ProxyManager(proxy, proxy_headers=proxy_headers, **options)


def form_encode(fields: Any) -> str:
    """A form or a query string exactly as `requests` writes it from a dict (or pairs): a list
    value repeats its key, None values are left out, text is UTF-8, spaces are '+'."""
    pairs = fields.items() if isinstance(fields, Mapping) else fields
    encoded = []
    for key, values in pairs:
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            values = [values]
        for value in values:
            if value is not None:
                encoded.append((key.encode("utf-8") if isinstance(key, str) else key,
                                value.encode("utf-8") if isinstance(value, str) else value))
    return urlencode(encoded, doseq=True)


def _basic_auth(username: str, password: str) -> str:
    """The Authorization header `requests` writes for a (username, password) pair."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode("latin1")).decode("ascii")


def _text(answer: Any) -> str:
    """The answer's body as text, as `requests`' `.text` decodes a JSON answer: its declared
    charset, else UTF-8 (Twilio answers JSON), undecodable bytes replaced."""
    charset = "utf-8"
    for param in (answer.headers.get("Content-Type") or "").split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "charset" and value:
            charset = value.strip("'\"")
    try:
        return answer.data.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know
        return answer.data.decode("utf-8", errors="replace")


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
