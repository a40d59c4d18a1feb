"""The backend API's JSON request bodies as pydantic models (no Flask, no database).

The same models validate requests and describe them in the OpenAPI document (bot/http/openapi.py),
so the description cannot drift from what is enforced. Every refusal is an `InvalidRequest` whose
text names the field and says why; pydantic's own errors (missing, unknown or mistyped fields) are
put into those words by `explain`, so a backend never sees pydantic's wording.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import zoneinfo
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Literal, Mapping, Self, TypeVar
from urllib.parse import urlparse

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      ValidationInfo, WrapValidator, model_validator)
from pydantic_core import ErrorDetails
from babel import Locale, UnknownLocaleError

from bot.delivery.holding import QUIET_HOURS_REFUSAL, InvalidQuietHours, parse_quiet_hours
from bot.phone import InvalidNumber, normalize_e164
from bot.channels.whatsapp.whatsapp import MAX_BODY_CHARS, MAX_TEMPLATE_VARIABLES_CHARS
from bot.vocabulary import Channel, Consent
from flows.toolkit import Flow

MAX_FLOW_VARIABLE_CHARS = 1024  # a flow's variables land in message copy of at most 1600 characters
MAX_CONSENT_NOTE_CHARS = 1000  # a longer note is kept cut to this length
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit: a longer subject header would be folded or refused


class InvalidRequest(ValueError):
    """The payload is wrong; the message says which field and why."""


# ---------------------------------------------------------------- the normalised /notify request


@dataclass(frozen=True)
class NotifyRequest:
    """A validated notification: exactly one of body/media or template, to `to` or `user_id`."""

    to: str | None = None  # E.164; None when addressed by user_id
    body: str | None = None
    media_urls: tuple[str, ...] = ()
    template: str | None = None
    content_sid: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    #: A conversation flow to start (with `variables`) instead of a single message.
    flow: str | None = None
    #: The backend's own object, echoed in the events about this message or conversation.
    metadata: dict[str, Any] | None = None
    #: The person writing (human handoff): the message is an agent's, not the bot's.
    agent: str | None = None
    #: The backend's user id instead of `to`, with the user's fields to store first (`user`).
    user_id: str | None = None
    user: dict[str, Any] | None = None
    #: A pinned channel; None: the user's channel order decides.
    channel: str | None = None
    #: The email's subject (free text by email needs one).
    subject: str | None = None
    #: When to send it (`send_at`), as naive UTC in ISO form (None: now).
    send_at: str | None = None
    #: The quiet hours of this request: None, the QUIET_HOURS setting; "" none ("quiet_hours":
    #: null); else "HH:MM-HH:MM".
    quiet_hours: str | None = None

    @property
    def send_at_utc(self) -> datetime | None:
        """`send_at` as the naive UTC the database stores."""
        return None if self.send_at is None else datetime.fromisoformat(self.send_at)

    @property
    def is_free_form(self) -> bool:
        """Free-form text or media, which WhatsApp allows only inside the 24-hour window."""
        return self.content_sid is None and self.flow is None and self.template is None

    def fingerprint(self) -> str:
        """A hash of the normalised request, to tell a replay from a reused Idempotency-Key.

        Stored with every keyed row, so its input (this dataclass's fields) must not change shape:
        a replay after a deploy must still match."""
        fields = asdict(self)
        for added_later in ("metadata", "agent", "user_id", "user", "channel", "subject", "send_at", "quiet_hours"):  # absent: the shape keys were stored with
            if fields[added_later] is None:
                del fields[added_later]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class NotifyContext:
    """The runtime configuration /notify validates against: template names and flows."""

    #: TWILIO_CONTENT_SIDS: a name -> one ContentSid, or -> {locale: ContentSid}.
    content_sids: Mapping[str, Any]
    flows: Mapping[str, Flow]
    #: Templates that have email copy (templates/email/<name>/): a user's notification may name one.
    email_templates: frozenset[str] = frozenset()


# ---------------------------------------------------------------- field building blocks


def refuse_as(message: str | Callable[[Any, list[ErrorDetails]], str]) -> WrapValidator:
    """Replace pydantic's complaint about a field with ours (a fixed text, or one built from the
    value and pydantic's errors); an `InvalidRequest` raised inside already says it our way."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            ours = _our_message(errors[0])
            raise InvalidRequest(ours or (message(value, errors) if callable(message) else message)) from None

    return WrapValidator(validate)


def _e164(value: str) -> str:
    try:
        return normalize_e164(value)
    except InvalidNumber as exc:
        raise InvalidRequest(f"'to' {exc}") from None


def _http_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("not an http(s) URL")
    return value


def _body_refusal(value: Any, errors: list[ErrorDetails]) -> str:
    if isinstance(value, str) and len(value) > MAX_BODY_CHARS:
        return f"'body' is {len(value)} characters; WhatsApp allows at most {MAX_BODY_CHARS}"
    return "'body' must be a non-empty string"


def _variables_refusal(value: Any, errors: list[ErrorDetails]) -> str:
    if not isinstance(value, dict):
        return "'variables' must be an object, e.g. {\"1\": \"Ada\"}"
    key = errors[0]["loc"][0]
    item = value.get(key)
    if isinstance(item, str) and len(item) > MAX_FLOW_VARIABLE_CHARS:
        return f"variable {key!r} in 'variables' is {len(item)} characters; at most {MAX_FLOW_VARIABLE_CHARS}"
    return f"variable {key!r} must be a string or a number"


NonBlank = Annotated[str, Field(pattern=r"\S")]
HttpUrlText = Annotated[str, AfterValidator(_http_url), Field(json_schema_extra={"format": "uri"})]
VariableValue = Annotated[str, Field(max_length=MAX_FLOW_VARIABLE_CHARS)] | int | float | None

#: The backend's metadata on /notify, as compact JSON (DESIGN: "metadata (object ≤ 4 KB)").
MAX_METADATA_BYTES = 4096
MAX_AGENT_CHARS = 100


def _small_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > MAX_METADATA_BYTES:
            raise InvalidRequest(f"'metadata' is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
    return value


def _metadata_refusal(value: Any, errors: list[ErrorDetails]) -> str:
    return "'metadata' must be a JSON object, e.g. {\"order_id\": \"A-17\"}"


SEND_AT_REFUSAL = ("'send_at' must be an RFC 3339 time with its offset, e.g. 2026-12-24T09:00:00+01:00 "
                   "or 2026-12-24T08:00:00Z")


def _rfc3339_utc(value: str) -> str:
    """An RFC 3339 date-time with an offset ('Z' or ±HH:MM), as naive UTC in ISO form. A time
    without an offset is refused: nobody can tell which 09:00 it means."""
    if not RFC3339.match(value):
        raise InvalidRequest(SEND_AT_REFUSAL)
    text = value.upper().replace("Z", "+00:00")
    fraction = RFC3339.match(value).group(1)
    if fraction and len(fraction) > 7:  # Python reads at most microseconds
        text = text.replace(fraction.upper(), fraction[:7], 1)
    try:
        moment = datetime.fromisoformat(text)
        return moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
    except (ValueError, OverflowError):
        raise InvalidRequest(SEND_AT_REFUSAL) from None


#: The quiet hours' form, for the OpenAPI document (and a first check before `parse_quiet_hours`).
QUIET_HOURS_JSON_PATTERN = r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$"
#: RFC 3339's date-time (section 5.6), fractions of a second allowed, the offset required.
RFC3339 = re.compile(r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z")


def _quiet_hours_text(value: str | None) -> str:
    """A request's quiet hours, normalised: "" for null (none), else "HH:MM-HH:MM"."""
    if value is None:
        return ""
    try:
        quiet = parse_quiet_hours(value)
    except InvalidQuietHours:
        raise InvalidRequest(f"'quiet_hours' {value[:40]!r}: {QUIET_HOURS_REFUSAL}; or null for none") from None
    if quiet is None:
        raise InvalidRequest("'quiet_hours' must be 'HH:MM-HH:MM', e.g. 21:00-08:00, or null for none")
    return str(quiet)


MEDIA_URL_REFUSAL = "'media_url' must be one http(s) URL (WhatsApp carries one media item per message)"


class RequestBody(BaseModel):
    """A JSON request body: strict types (no "1" for 1, no true for 1), and no value that JSON
    allows but no message or database can hold (see `check_json_values`)."""

    # Python's re, so that "\S" means what str.strip() means (the Rust engine's \s lacks \x1c-\x1f).
    model_config = ConfigDict(strict=True, allow_inf_nan=False, regex_engine="python-re")

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_json_values(data, "")
        return data


# ---------------------------------------------------------------- POST /notify


class NotifyBody(RequestBody):
    """POST /notify: `to` and exactly one of a message (`body` and/or `media_url`), a `template`
    (with `variables`) or a `flow` (with `variables`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"to": "+15551234567", "body": "Your order has shipped"},
        {"to": "+15551234567", "body": "Your receipt", "media_url": "https://example.com/receipt.pdf"},
        {"to": "+15551234567", "template": "order_update", "variables": {"1": "Ada", "2": 42}},
        {"to": "+15551234567", "flow": "appointment",
         "variables": {"name": "Ada", "date": "Tue 3 March", "time": "10:30", "appointment_id": "A-17"}},
        {"to": "+15551234567", "template": "order_update", "variables": {"1": "Ada", "2": 42},
         "send_at": "2026-12-24T09:00:00+01:00", "quiet_hours": "21:00-08:00"},
        {"user_id": "123", "flow": "appointment", "send_at": "2026-12-24T09:00:00+01:00",
         "variables": {"name": "Ada", "date": "Tue 3 March", "time": "10:30", "appointment_id": "A-17"}},
    ]})

    to: Annotated[str | None, AfterValidator(lambda v: v if v is None else _e164(v)),
                  refuse_as("'to' must be a string"), Field(
        description="the recipient's number in E.164, e.g. +15551234567 (a `whatsapp:` prefix, spaces "
                    "and a leading 00 are accepted); or give `user_id` instead", examples=["+15551234567"])] = None
    user_id: Annotated[str | None, AfterValidator(lambda v: v if v is None else check_user_id(v)),
                       refuse_as("'user_id' must be a string"), Field(
        description="your own id of the user (PUT /users/<user_id>) instead of `to`",
        examples=["123"])] = None
    user: Annotated[dict[str, Any] | None, refuse_as("'user' must be an object of the user's fields"), Field(
        description="the user's fields (phone, email, name, locale, timezone, channels: as PUT "
                    "/users/<user_id>), stored before sending; only with `user_id`")] = None
    channel: Annotated[Literal["whatsapp", "email"] | None,
                       refuse_as("'channel' must be \"whatsapp\" or \"email\""), Field(
        description="send on this channel only; without it the user's `channels` order decides")] = None
    subject: Annotated[Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT_CHARS, pattern=r"\S")] | None,
                       refuse_as(f"'subject' must be text of 1 to {MAX_SUBJECT_CHARS} characters"), Field(
        description="the email's subject (needed for free text by email)")] = None
    body: Annotated[Annotated[str, Field(max_length=MAX_BODY_CHARS, pattern=r"\S")] | None, refuse_as(_body_refusal),
                    Field(description="free-form text; WhatsApp allows it only within 24 hours of the "
                                      "contact's last message")] = None
    media_url: Annotated[HttpUrlText | Annotated[list[HttpUrlText], Field(min_length=1, max_length=1)] | None,
                         refuse_as(MEDIA_URL_REFUSAL),
                         Field(description="one http(s) URL of an image or document, with or without `body`")] = None
    template: Annotated[NonBlank | None, refuse_as("'template' must be a template name"), Field(
        description="an approved template's name in TWILIO_CONTENT_SIDS, or its HX… ContentSid")] = None
    variables: Annotated[dict[str, VariableValue] | None, refuse_as(_variables_refusal), Field(
        description=f"the template's or the flow's variables; a template's add up to at most "
                    f"{MAX_TEMPLATE_VARIABLES_CHARS} characters and take no null")] = None
    flow: Annotated[str | None, refuse_as("'flow' must be a flow's name (a string)"), Field(
        description="a conversation flow to start instead of sending a message")] = None
    metadata: Annotated[dict[str, Any] | None, AfterValidator(_small_metadata),
                        refuse_as(_metadata_refusal), Field(
        description=f"your own JSON object (at most {MAX_METADATA_BYTES} bytes as JSON), echoed in every "
                    "event about this message or conversation and in GET /messages/<id>",
        examples=[{"order_id": "A-17"}])] = None
    send_at: Annotated[str | None, AfterValidator(lambda v: v if v is None else _rfc3339_utc(v)),
                       refuse_as(SEND_AT_REFUSAL), Field(
        description="when to send it (a `flow`: when to start it): an RFC 3339 time with its offset, from "
                    "now to 35 days ahead; the message (or flow) waits in the database until then (cancel it "
                    "with POST /messages/<id>/cancel, a flow with POST /conversations/<id>/cancel)",
        json_schema_extra={"format": "date-time"}, examples=["2026-12-24T09:00:00+01:00"])] = None
    quiet_hours: Annotated[Annotated[str, Field(pattern=QUIET_HOURS_JSON_PATTERN)] | None, refuse_as("'quiet_hours' must be 'HH:MM-HH:MM', e.g. 21:00-08:00, or null for none"),
                           Field(
        description="this request's quiet hours in the user's timezone, `HH:MM-HH:MM` (e.g. 21:00-08:00); "
                    "null: none for this request; omitted: the QUIET_HOURS setting. A message that would "
                    "arrive inside them is held until they end; so is a flow's start and its first messages "
                    "(never its replies to the user's answers)",
        examples=["21:00-08:00"])] = None
    agent: Annotated[str | None, Field(min_length=1, max_length=MAX_AGENT_CHARS, pattern=r"\S"),
                     refuse_as(f"'agent' must be the name or id of the person writing (1 to {MAX_AGENT_CHARS} characters)"),
                     Field(description="the person writing during a human handoff; the message is marked "
                                       "as an agent's (kind `agent`)")] = None

    _content_sid: str | None = PrivateAttr(default=None)
    _user_changes: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_kind_of_message(self, info: ValidationInfo) -> Self:
        """Exactly one of message, template or flow; templates and flows that exist here."""
        context = info.context
        if not isinstance(context, NotifyContext):
            raise TypeError("validate NotifyBody with context=NotifyContext(...) (templates and flows)")
        self._check_recipient()
        message_given = self.body is not None or self.media_url is not None
        if self.flow is not None:
            if message_given or self.template is not None:
                raise InvalidRequest("send either 'flow' (with 'variables') or a message, not both")
            self._check_flow(context.flows)
        elif self.template is not None:
            if message_given:
                raise InvalidRequest("send either 'template' (with 'variables') or 'body'/'media_url', not both")
            self._content_sid = self._check_template(context)
        elif "variables" in self.model_fields_set:
            raise InvalidRequest("'variables' only goes with 'template'")
        elif not message_given:
            raise InvalidRequest("one of 'body', 'media_url', 'template' or 'flow' is required")
        return self

    def _check_flow(self, flows: Mapping[str, Flow]) -> None:
        flow = flows.get(self.flow)
        if flow is None or not flow.backend_can_start:
            startable = sorted(name for name, f in flows.items() if f.backend_can_start)
            raise InvalidRequest(f"unknown flow {self.flow!r}; flows a backend can start: {', '.join(startable) or 'none'}")
        variables = self.variables or {}
        missing = [name for name in flow.required_variables if not str(variables.get(name) or "").strip()]
        if missing:
            raise InvalidRequest(f"flow {self.flow!r} needs variables: {', '.join(missing)}")

    def _check_recipient(self) -> None:
        """Exactly one of `to` or `user_id`; `user` only with `user_id`; `to` is WhatsApp only."""
        for name in ("to", "user_id"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise InvalidRequest(f"'{name}' must be a string")
        if (self.to is None) == (self.user_id is None):
            raise InvalidRequest("'to' (a phone number) or 'user_id' (your user's id) is required, not both")
        if self.user is not None:
            if self.user_id is None:
                raise InvalidRequest("'user' goes with 'user_id' (the user it stores)")
            self._user_changes = validate(UserBody, self.user).changes()
        if self.to is not None and self.channel not in (None, "whatsapp"):
            raise InvalidRequest("'to' is a phone number: only \"whatsapp\" reaches it; use 'user_id' for email")

    def _check_template(self, context: NotifyContext) -> str | None:
        """The template's ContentSid (a configured name with one SID, or an HX… SID given
        directly); None for a template configured per locale, or one that exists only as a
        user's email copy."""
        content_sids = context.content_sids
        if self.template in content_sids:
            # One SID: the default locale's. Per locale ({"en": "HX…", …}): the route resolves the
            # recipient's locale (bot/locales.py), so nothing is chosen here.
            entry = content_sids[self.template]
            content_sid = entry if isinstance(entry, str) else None
        elif self.template.startswith("HX") and len(self.template) == 34:
            content_sid = self.template
        elif self.user_id is not None and self.template in context.email_templates:
            content_sid = None
        else:
            names = set(content_sids) | (set(context.email_templates) if self.user_id is not None else set())
            known = ", ".join(sorted(names)) or "none configured (TWILIO_CONTENT_SIDS)"
            raise InvalidRequest(f"unknown template {self.template!r}; known templates: {known}")
        for key, value in (self.variables or {}).items():
            if value is None:
                raise InvalidRequest(f"variable {key!r} must be a string or a number")
        if sum(len(str(value)) for value in (self.variables or {}).values()) > MAX_TEMPLATE_VARIABLES_CHARS:
            raise InvalidRequest(f"'variables' exceed WhatsApp's {MAX_TEMPLATE_VARIABLES_CHARS}-character template limit")
        return content_sid

    def normalised(self) -> NotifyRequest:
        """The request the route stores: E.164 `to`, media as a tuple, template variables as text."""
        extra = {"metadata": self.metadata, "agent": self.agent.strip() if self.agent else None,
                 "user_id": self.user_id, "user": self._user_changes, "channel": self.channel,
                 "subject": self.subject, "send_at": self.send_at,
                 "quiet_hours": _quiet_hours_text(self.quiet_hours) if "quiet_hours" in self.model_fields_set else None}
        if self.flow is not None:
            return NotifyRequest(to=self.to, flow=self.flow, variables=dict(self.variables or {}), **extra)
        if self.template is not None:
            variables = {key: str(value) for key, value in (self.variables or {}).items()}
            return NotifyRequest(to=self.to, template=self.template, content_sid=self._content_sid,
                                 variables=variables, **extra)
        media = self.media_url
        media_urls = tuple(media) if isinstance(media, list) else (media,) if media is not None else ()
        return NotifyRequest(to=self.to, body=self.body, media_urls=media_urls, **extra)


def parse_notify(payload: Any, content_sids: Mapping[str, Any], flows: Mapping[str, Flow] | None = None,
                 email_templates: frozenset[str] = frozenset()) -> NotifyRequest:
    """Validate a decoded JSON payload against the HTTP contract (docs/api.md, "Sending a notification").

    Raises InvalidRequest naming the field."""
    context = NotifyContext(content_sids=content_sids, flows=flows or {}, email_templates=email_templates)
    return validate(NotifyBody, payload, context=context).normalised()


# ---------------------------------------------------------------- PUT /contacts/<phone>/consent


class ConsentBody(RequestBody):
    """PUT /contacts/<phone>/consent: consent the backend collected elsewhere (e.g. a checkbox)."""

    # Unknown fields are ignored here, as they always were: refusing them now would break callers.
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"consent": Consent.OPTED_IN, "note": "web signup form"}]})

    consent: Annotated[Literal[Consent.OPTED_IN, Consent.OPTED_OUT],
                       refuse_as("'consent' must be \"opted_in\" or \"opted_out\""),
                       Field(description="\"opted_in\" or \"opted_out\" (opting out sends the contact nothing)")]
    note: Annotated[str | None, refuse_as("'note' must be a string"), Field(
        description=f"where the consent came from; kept up to {MAX_CONSENT_NOTE_CHARS} characters")] = None


# ---------------------------------------------------------------- POST /contacts/<phone>/handoff


MAX_HANDOFF_REASON_CHARS = 500
MAX_HANDOFF_HOURS = 24 * 30


class HandoffBody(RequestBody):
    """POST /contacts/<phone>/handoff: a person takes over the contact (both fields optional)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"reason": "billing question", "hours": 24}, {}]})

    reason: Annotated[str | None, Field(max_length=MAX_HANDOFF_REASON_CHARS),
                      refuse_as(f"'reason' must be text of at most {MAX_HANDOFF_REASON_CHARS} characters"),
                      Field(description="why (shown in the handoff events)")] = None
    hours: Annotated[float | None, Field(gt=0, le=MAX_HANDOFF_HOURS),
                     refuse_as(f"'hours' must be a number above 0 and at most {MAX_HANDOFF_HOURS}"),
                     Field(description="how long before the bot takes over again by itself (default HANDOFF_HOURS)")] = None


# ---------------------------------------------------------------- POST /events/retry


SINCE_REFUSAL = "'since' must be an ISO 8601 time such as 2026-12-05T10:00:00Z"


def _utc_moment(value: str) -> datetime:
    """`value` as the naive UTC the database stores (bot.clock). A time whose offset carries it
    past year 1 or 9999 ("0001-01-01T00:00:00+01:00") is refused like any other bad time: Python
    raises OverflowError for it, not ValueError."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment
    except (ValueError, OverflowError):
        raise InvalidRequest(SINCE_REFUSAL) from None


def _iso_time(value: str) -> str:
    _utc_moment(value)
    return value


class ReplayBody(RequestBody):
    """POST /events/retry: deliver again every event that failed since a time."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"since": "2026-12-05T00:00:00Z"}]})

    since: Annotated[str, AfterValidator(_iso_time), refuse_as(SINCE_REFUSAL),
                     Field(description="events created at or after this time (UTC if no offset)",
                           json_schema_extra={"format": "date-time"})]

    def since_utc(self) -> datetime:
        """`since` as the naive UTC the database stores (bot.clock)."""
        return _utc_moment(self.since)


# ---------------------------------------------------------------- PUT /users/<user_id> and /notify's `user`
# An omitted field is kept and `null` clears it, so a model's `model_fields_set` says which fields
# the request touched. Every value is normalised here (E.164 phone, lowercased email, BCP 47
# locale, IANA timezone), so what is stored compares equal however the backend spelled it.

MAX_USER_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_EMAIL_CHARS = 254  # RFC 5321's path limit, less the angle brackets


def check_user_id(user_id: str) -> str:
    """A backend's user id as a route takes it: 1 to 128 printable characters; else InvalidRequest."""
    if not 0 < len(user_id) <= MAX_USER_ID_CHARS:
        raise InvalidRequest(f"'user_id' must be 1 to {MAX_USER_ID_CHARS} characters")
    if not user_id.isprintable() or user_id != user_id.strip():
        raise InvalidRequest("'user_id' must be printable text without leading or trailing spaces")
    return user_id


def _phone(value: str) -> str:
    try:
        return normalize_e164(value)
    except InvalidNumber as exc:
        raise InvalidRequest(f"'phone' {exc}") from None


def _email(value: str) -> str:
    if len(value) > MAX_EMAIL_CHARS:
        raise InvalidRequest(f"'email' is longer than {MAX_EMAIL_CHARS} characters")
    # Imported here, on a user's first address, not by every web process at start: email-validator
    # and the idna tables it loads are memory no other request needs (bench/THROUGHPUT.md, "Web memory").
    from email_validator import EmailNotValidError, validate_email

    try:
        # No DNS lookup: a request must not wait on the network, and a backend's address book
        # is its own; only the syntax is checked (email-validator, RFC 5322/6531).
        normalized = validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidRequest(f"'email' is not a valid address: {exc}") from None
    return normalized.lower()


def _locale(value: str) -> str:
    try:
        locale = Locale.parse(value.strip().replace("_", "-"), sep="-")
    except (UnknownLocaleError, ValueError, TypeError):
        raise InvalidRequest(f"'locale' {value[:40]!r} is not a known BCP 47 locale, e.g. pt-BR or en") from None
    return "-".join(part for part in (locale.language, locale.script, locale.territory) if part)


@functools.cache
def _timezones() -> frozenset[str]:
    # The IANA names zoneinfo knows (tzdata on a machine without a system database); a set lookup
    # rather than ZoneInfo(value), which would also read a file path a request names.
    return frozenset(zoneinfo.available_timezones())


def _timezone(value: str) -> str:
    if value not in _timezones():
        raise InvalidRequest(f"'timezone' {value[:64]!r} is not an IANA timezone, e.g. America/Sao_Paulo")
    return value


def _channels(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise InvalidRequest("'channels' names a channel twice")
    return value


#: A user's tags (PUT /users/<id> {"tags": [...]}; a broadcast's audience by tag): how many, and
#: what one may look like.
MAX_TAGS = 50
MAX_TAG_CHARS = 64
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z")
TAG_REFUSAL = (f"a tag is 1 to {MAX_TAG_CHARS} letters, digits, '_', '.', ':' or '-', starting with a letter "
               "or digit")


def check_tags(tags: list[str]) -> list[str]:
    """Tags as stored: each shape-checked and lowercased ("VIP" and "vip" are one tag), repeats dropped."""
    seen: dict[str, None] = {}
    for tag in tags:
        if not isinstance(tag, str) or not TAG.match(tag):
            raise InvalidRequest(TAG_REFUSAL)
        seen.setdefault(tag.lower(), None)
    return list(seen)


CHANNELS_REFUSAL = f"'channels' must be a list of channels in order of preference, from: {', '.join(Channel)}"


class UserBody(RequestBody):
    """A user's fields. Omitted: kept as stored; null: cleared."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"phone": "+5511912345678", "email": "ada@example.com", "name": "Ada", "locale": "pt-BR",
         "timezone": "America/Sao_Paulo", "channels": ["whatsapp", "email"]},
        {"email": "grace@example.com", "channels": ["email"]},
    ]})

    phone: Annotated[str | None, AfterValidator(lambda v: v if v is None else _phone(v)),
                     refuse_as("'phone' must be a string"),
                     Field(description="E.164, e.g. +15551234567 (spaces, a leading 00 or `whatsapp:` accepted)")] = None
    email: Annotated[str | None, AfterValidator(lambda v: v if v is None else _email(v)),
                     refuse_as("'email' must be a string"), Field(description="an email address")] = None
    name: Annotated[Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"\S")] | None,
                    refuse_as(f"'name' must be text of 1 to {MAX_NAME_CHARS} characters"),
                    Field(description="how to address the person (available to templates as `name`)")] = None
    locale: Annotated[str | None, AfterValidator(lambda v: v if v is None else _locale(v)),
                      refuse_as("'locale' must be a string such as pt-BR"),
                      Field(description="BCP 47, e.g. pt-BR")] = None
    timezone: Annotated[str | None, AfterValidator(lambda v: v if v is None else _timezone(v)),
                        refuse_as("'timezone' must be a string such as America/Sao_Paulo"),
                        Field(description="IANA, e.g. America/Sao_Paulo")] = None
    channels: Annotated[Annotated[list[Literal[Channel.WHATSAPP.value, Channel.EMAIL.value]], Field(min_length=1, max_length=len(Channel))] | None,
                        AfterValidator(lambda v: v if v is None else _channels([str(c) for c in v])),
                        refuse_as(CHANNELS_REFUSAL),
                        Field(description="the order of channels to try, e.g. [\"whatsapp\", \"email\"]; "
                                          "null: the default order")] = None
    tags: Annotated[Annotated[list[str], Field(max_length=MAX_TAGS)] | None,
                    AfterValidator(lambda v: v if v is None else check_tags(v)),
                    refuse_as(f"'tags' must be a list of at most {MAX_TAGS} tags ({TAG_REFUSAL})"),
                    Field(description="the user's tags, replacing any stored (a broadcast's audience may name "
                                      "them); null or []: none")] = None

    def changes(self) -> dict[str, Any]:
        """The fields the request named, normalised (None where it asked to clear one)."""
        return {name: getattr(self, name) for name in self.model_fields_set}


# ---------------------------------------------------------------- validation and its wording

Body = TypeVar("Body", bound=RequestBody)


def validate(model: type[Body], payload: Any, context: Any = None) -> Body:
    """`payload` as `model`, or InvalidRequest naming the field and saying why."""
    try:
        return model.model_validate(payload, context=context)
    except ValidationError as exc:
        raise InvalidRequest(explain(model, exc)) from None


def explain(model: type[BaseModel], exc: ValidationError) -> str:
    """One sentence for a backend developer: the first thing wrong, in the order a person reads
    the body (unknown fields, then the fields in order, then how they combine)."""
    errors = exc.errors(include_url=False)
    unknown = sorted(str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden")
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(model.model_fields))}"
    error = errors[0]
    ours = _our_message(error)
    if ours:
        return ours
    where = error["loc"][0] if error["loc"] else None
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "the JSON body must be an object"
    if error["type"] == "missing" and isinstance(where, str) and where in model.model_fields:
        description = model.model_fields[where].description
        return f"'{where}' is required" + (f": {description}" if description else "")
    return f"'{where}': {error['msg']}" if where is not None else error["msg"]


def _our_message(error: ErrorDetails) -> str | None:
    """The text of an InvalidRequest raised inside a validator, if that is what this error is."""
    cause = error.get("ctx", {}).get("error")
    return str(cause) if isinstance(cause, InvalidRequest) else None


def check_json_values(value: Any, where: str) -> None:
    """Refuse what JSON parsers accept but no message or database can hold: NaN and Infinity
    (Python's parser takes them), NUL characters (PostgreSQL text cannot store them) and lone
    surrogates (no encoding can).

    Walks with its own stack, not recursion: a body nested as deep as the JSON parser allows must
    be a 400, not a RecursionError."""
    pending: list[tuple[Any, str]] = [(value, where)]
    while pending:
        value, where = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"{where or 'the body'} must be a finite number, not {value}")
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidRequest(f"{where or 'the body'} contains a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800"): valid JSON, not valid text
                raise InvalidRequest(f"{where or 'the body'} is not valid Unicode text (a lone surrogate)") from None
        children: list[tuple[Any, str]] = []
        if isinstance(value, dict):
            for key, item in value.items():
                children.append((key, f"a key of {where or 'the body'}"))
                children.append((item, f"{where}.{key}" if where else f"'{key}'"))
        elif isinstance(value, list):
            children = [(item, f"{where}[{index}]") for index, item in enumerate(value)]
        pending.extend(reversed(children))  # depth first, in document order, as a reader would
