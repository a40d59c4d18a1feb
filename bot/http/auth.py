"""Request authentication: Twilio's X-Twilio-Signature and the backend's bearer token."""
from __future__ import annotations

import functools
import hmac
from typing import Any, Callable, TypeVar

from urllib.parse import urlparse

from flask import current_app, jsonify, request
from twilio.request_validator import RequestValidator, add_port, remove_port

F = TypeVar("F", bound=Callable[..., Any])


def webhook_url_for_request() -> str:
    """The URL Twilio signed: TWILIO_WEBHOOK_URL when configured, else the URL as requested.

    The configured public URL is the robust choice behind proxies and tunnels; without it, the
    request URL is used, which ProxyFix corrects for X-Forwarded-Proto/Host.
    """
    configured = current_app.config.get("TWILIO_WEBHOOK_URL")
    if not configured:
        return request.url
    # Connection overrides (`#rc=3&rp=5xx`, docs/deploying.md) tell Twilio how to retry; Twilio signs the
    # URL without them, and the configured URL keeps them for every send's StatusCallback.
    configured = configured.split("#", 1)[0]
    if request.query_string and "?" not in configured:
        return configured + "?" + request.query_string.decode("latin-1")
    return configured


@functools.lru_cache(maxsize=256)
def signed_url_forms(url: str) -> tuple[str, ...]:
    """The URL as given first (what Twilio signs: the URL as configured), then the forms the
    SDK's RequestValidator.validate tries, without and with the port. Cached: with
    TWILIO_WEBHOOK_URL set it is the same URL on every request."""
    parsed = urlparse(url)
    return tuple(dict.fromkeys((url, remove_port(parsed), add_port(parsed))))


def _validator() -> RequestValidator:
    """The SDK's validator, built once per app and auth token (it only holds the key)."""
    token = current_app.config["TWILIO_AUTH_TOKEN"]
    built = current_app.extensions.get("twilio_request_validator")
    if built is None or built[0] != token:
        built = (token, RequestValidator(token))
        current_app.extensions["twilio_request_validator"] = built
    return built[1]


def twilio_signature_valid() -> bool:
    """Whether this request carries a valid X-Twilio-Signature over its URL and form.

    The SDK's `compute_signature` over the URL as signed, then (only if that does not match) over
    its other form with or without the port: one HMAC for a genuine request where `validate`
    always computes two (issue 17, bench/THROUGHPUT.md "The web's hot path").
    """
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature:
        return False
    validator, form, given = _validator(), request.form, signature.encode("utf-8", "replace")
    return any(hmac.compare_digest(validator.compute_signature(url, form).encode(), given)
               for url in signed_url_forms(webhook_url_for_request()))


def validate_twilio_request(view: F) -> F:
    """Decorator (after django-twilio's twilio_view): 403 unless Twilio signed this request."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not twilio_signature_valid():
            current_app.logger.warning("rejected webhook with a missing or invalid X-Twilio-Signature")
            return jsonify(error="invalid or missing X-Twilio-Signature"), 403
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def require_api_token(view: F) -> F:
    """Decorator: 401 unless `Authorization: Bearer $NOTIFY_API_TOKEN` (constant-time compare)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = current_app.config["NOTIFY_API_TOKEN"]
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            response = jsonify(error="missing or invalid bearer token (Authorization: Bearer <NOTIFY_API_TOKEN>)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="notify"'
            return response, 401
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
