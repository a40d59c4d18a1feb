"""Validation of POST /notify bodies into a normalised request (no Flask, no database)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping
from urllib.parse import urlparse

from bot.phone import InvalidNumber, normalize_e164
from bot.twilio.whatsapp import MAX_BODY_CHARS, MAX_TEMPLATE_VARIABLES_CHARS
from flows.toolkit import Flow

ALLOWED_FIELDS = frozenset({"to", "body", "template", "variables", "media_url", "flow"})
MAX_FLOW_VARIABLE_CHARS = 1024  # a flow's variables land in message copy of at most 1600 characters


class InvalidRequest(ValueError):
    """The payload is wrong; the message says which field and why."""


@dataclass(frozen=True)
class NotifyRequest:
    """A validated notification: exactly one of body/media or template."""

    to: str  # E.164
    body: str | None = None
    media_urls: tuple[str, ...] = ()
    template: str | None = None
    content_sid: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    #: A conversation flow to start (with `variables`) instead of a single message.
    flow: str | None = None

    @property
    def is_free_form(self) -> bool:
        """Free-form text or media, which WhatsApp allows only inside the 24-hour window."""
        return self.content_sid is None and self.flow is None

    def fingerprint(self) -> str:
        """A hash of the normalised request, to tell a replay from a reused Idempotency-Key."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parsed = urlparse(value)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def parse_notify(payload: Any, content_sids: dict[str, str], flows: Mapping[str, Flow] | None = None) -> NotifyRequest:
    """Validate a decoded JSON payload against the HTTP contract (README, "Sending a notification").

    Raises InvalidRequest naming the field."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the JSON body must be an object")
    check_json_values(payload, "")
    unknown = sorted(set(payload) - ALLOWED_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(ALLOWED_FIELDS))}")

    if "to" not in payload:
        raise InvalidRequest("'to' is required: the recipient's number in E.164, e.g. +15551234567")
    try:
        to = normalize_e164(payload["to"])
    except InvalidNumber as exc:
        raise InvalidRequest(f"'to' {exc}") from None

    body = payload.get("body")
    template = payload.get("template")
    media = payload.get("media_url")
    if body is not None and (not isinstance(body, str) or not body.strip()):
        raise InvalidRequest("'body' must be a non-empty string")
    if body is not None and len(body) > MAX_BODY_CHARS:
        raise InvalidRequest(f"'body' is {len(body)} characters; WhatsApp allows at most {MAX_BODY_CHARS}")

    media_urls: tuple[str, ...] = ()
    if media is not None:
        items = media if isinstance(media, list) else [media]
        if len(items) != 1 or not _is_http_url(items[0]):
            raise InvalidRequest("'media_url' must be one http(s) URL (WhatsApp carries one media item per message)")
        media_urls = (items[0],)

    if payload.get("flow") is not None:
        if body is not None or media is not None or template is not None:
            raise InvalidRequest("send either 'flow' (with 'variables') or a message, not both")
        return _flow_request(to, payload["flow"], payload.get("variables"), flows or {})
    if template is not None:
        if body is not None or media is not None:
            raise InvalidRequest("send either 'template' (with 'variables') or 'body'/'media_url', not both")
        return _template_request(to, template, payload.get("variables"), content_sids)
    if "variables" in payload:
        raise InvalidRequest("'variables' only goes with 'template'")
    if body is None and not media_urls:
        raise InvalidRequest("one of 'body', 'media_url', 'template' or 'flow' is required")
    return NotifyRequest(to=to, body=body, media_urls=media_urls)


def check_json_values(value: Any, where: str) -> None:
    """Refuse what JSON parsers accept but no message or database can hold: NaN and Infinity
    (Python's parser takes them), NUL characters (PostgreSQL text cannot store them) and lone
    surrogates (no encoding can)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{where or 'the body'} must be a finite number, not {value}")
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidRequest(f"{where or 'the body'} contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): valid JSON, not valid text
            raise InvalidRequest(f"{where or 'the body'} is not valid Unicode text (a lone surrogate)") from None
    if isinstance(value, dict):
        for key, item in value.items():
            check_json_values(key, f"a key of {where or 'the body'}")
            check_json_values(item, f"{where}.{key}" if where else f"'{key}'")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json_values(item, f"{where}[{index}]")


def _flow_request(to: str, name: Any, variables: Any, flows: Mapping[str, Flow]) -> NotifyRequest:
    startable = sorted(n for n, f in flows.items() if f.backend_can_start)
    if not isinstance(name, str) or name not in flows or not flows[name].backend_can_start:
        raise InvalidRequest(f"unknown flow {name!r}; flows a backend can start: {', '.join(startable) or 'none'}")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise InvalidRequest("'variables' must be an object")
    for key, value in variables.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise InvalidRequest(f"variable {key!r} must be a string or a number")
        if isinstance(value, str) and len(value) > MAX_FLOW_VARIABLE_CHARS:
            raise InvalidRequest(f"variable {key!r} is {len(value)} characters; at most {MAX_FLOW_VARIABLE_CHARS}")
    missing = [v for v in flows[name].required_variables if not str(variables.get(v) or "").strip()]
    if missing:
        raise InvalidRequest(f"flow {name!r} needs variables: {', '.join(missing)}")
    return NotifyRequest(to=to, flow=name, variables=dict(variables))


def _template_request(to: str, template: Any, variables: Any, content_sids: dict[str, str]) -> NotifyRequest:
    if not isinstance(template, str) or not template.strip():
        raise InvalidRequest("'template' must be a template name")
    if template in content_sids:
        content_sid = content_sids[template]
    elif template.startswith("HX") and len(template) == 34:
        content_sid = template  # a ContentSid given directly
    else:
        known = ", ".join(sorted(content_sids)) or "none configured (TWILIO_CONTENT_SIDS)"
        raise InvalidRequest(f"unknown template {template!r}; known templates: {known}")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise InvalidRequest("'variables' must be an object, e.g. {\"1\": \"Ada\"}")
    clean: dict[str, str] = {}
    for key, value in variables.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InvalidRequest(f"variable {key!r} must be a string or a number")
        clean[str(key)] = str(value)
    if sum(len(v) for v in clean.values()) > MAX_TEMPLATE_VARIABLES_CHARS:
        raise InvalidRequest(f"'variables' exceed WhatsApp's {MAX_TEMPLATE_VARIABLES_CHARS}-character template limit")
    return NotifyRequest(to=to, template=template, content_sid=content_sid, variables=clean)
