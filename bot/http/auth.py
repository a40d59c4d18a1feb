"""Request authentication: Twilio's X-Twilio-Signature and the backend's bearer token."""
from __future__ import annotations

import functools
import hmac
from typing import Any, Callable, TypeVar

from urllib.parse import parse_qsl, urlparse

from flask import current_app, jsonify, request
from twilio.request_validator import RequestValidator, add_port, remove_port
from werkzeug.datastructures import ImmutableMultiDict, MultiDict

F = TypeVar("F", bound=Callable[..., Any])
#: Where the parsed form is kept for the rest of the request (the WSGI environ dies with it).
_FORM_KEY = "bot.twilio_form"
URLENCODED = "application/x-www-form-urlencoded"


def twilio_form() -> MultiDict[str, str]:
    """The request's form, parsed once: what `request.form` holds, for less CPU.

    Twilio posts `application/x-www-form-urlencoded`; such a body is parsed exactly as Werkzeug's
    form parser does it (`parse_qsl` over the decoded body, blank values kept, the same error
    handler), without the parser objects and stream wrappers around it: half the CPU of
    `request.form` (bench/THROUGHPUT.md, "The web's hot path"). The signature is computed over
    this form and the webhook reads its fields from it. Any other content type goes through
    `request.form` as before.
    """
    form = request.environ.get(_FORM_KEY)
    if form is None:
        if request.mimetype == URLENCODED:
            # get_data() reads the stream under MAX_CONTENT_LENGTH, as the form parser does.
            try:
                pairs = parse_qsl(request.get_data().decode(), keep_blank_values=True, errors="werkzeug.url_quote")
            except ValueError:  # a body that is not UTF-8: an empty form, as Werkzeug's (silent) parser gives
                pairs = []
            form = ImmutableMultiDict(pairs)
        else:
            form = request.form
        request.environ[_FORM_KEY] = form
    return form


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
    validator, form, given = _validator(), twilio_form(), signature.encode("utf-8", "replace")
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
