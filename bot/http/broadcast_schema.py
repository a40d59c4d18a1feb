"""POST /broadcasts' JSON body as a pydantic model (no Flask, no database), like bot/http/schemas.py.

What the request checks is what can be checked at once without the database: shapes, sizes, the
template, `send_at`'s range and the `$user.<field>` references in `variables`. Phone numbers are
checked for their shape only; libphonenumber's full check costs about 30 µs a number, three
seconds for 100,000, so the worker does it while expanding and counts a number it refuses as
skipped `invalid_phone` (docs/api.md, "Broadcasts").
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Mapping, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

from bot.broadcasts.variables import USER_FIELDS, USER_REFERENCE
from bot.delivery.holding import InvalidQuietHours, parse_quiet_hours
from bot.channels.whatsapp.whatsapp import MAX_BODY_CHARS, MAX_TEMPLATE_VARIABLES_CHARS
from bot.http.schemas import (MAX_FLOW_VARIABLE_CHARS, MAX_SUBJECT_CHARS, MAX_USER_ID_CHARS, InvalidRequest,
                              RequestBody, _metadata_refusal, _small_metadata, check_tags, check_user_id, refuse_as,
                              validate)

#: User ids and phones one request may list (the issue's 100,000), and tags it may name.
MAX_AUDIENCE = 100_000
MAX_AUDIENCE_TAGS = 20
#: A broadcast's body: up to 100,000 user ids of a typical length fit; the route raises Flask's
#: limit (MAX_CONTENT_LENGTH, 256 KB) to this for itself only.
MAX_BROADCAST_BYTES = 8 * 1024 * 1024
#: How far ahead `send_at` may be: Twilio's own scheduling allows 35 days.
MAX_SEND_AHEAD = timedelta(days=35)
#: A phone as the request checks it: a plausible international number; the worker checks the rest.
PHONE_SHAPE = re.compile(r"(?i:whatsapp:)?\s*(\+|00)[0-9][0-9 ().\-]{5,24}\Z")
def _user_ids(values: list[str]) -> list[str]:
    for value in values:
        check_user_id(value)
    return values


#: E.164 allows at most 15 digits after the +.
E164_MAX_DIGITS = 15


def _phones(values: list[str]) -> list[str]:
    """The listed numbers as `+` and their digits (formatting dropped, `00` read as `+`): what
    `broadcast_targets.phone` stores; libphonenumber's full check is the worker's."""
    compact = []
    for index, value in enumerate(values):
        shape = PHONE_SHAPE.match(value)
        # The digits after the international prefix (`+` or `00`, group 1).
        digits = "".join(ch for ch in value[shape.end(1):] if ch.isdigit()) if shape else ""
        if not digits or len(digits) > E164_MAX_DIGITS:
            raise InvalidRequest(f"'audience.phones'[{index}] is not an international number (+ and digits, E.164)")
        compact.append("+" + digits)
    return compact


def _variable(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(USER_REFERENCE):
        field = value[len(USER_REFERENCE):]
        if field not in USER_FIELDS:
            raise InvalidRequest(f"variable reference {value[:80]!r} names no user field; "
                                 f"known: {', '.join(USER_REFERENCE + name for name in USER_FIELDS)}")
    return value


def _quiet_hours(value: str) -> str:
    try:
        return str(parse_quiet_hours(value) or "")
    except InvalidQuietHours as exc:
        raise InvalidRequest(f"'quiet_hours': {exc}") from None


def _send_at(value: str) -> datetime:
    """RFC 3339 with an offset, as the naive UTC the database stores; in the future, within 35 days."""
    refusal = "'send_at' must be an RFC 3339 time with an offset, e.g. 2026-12-24T09:00:00-03:00"
    if not isinstance(value, str) or "T" not in value.upper():
        raise InvalidRequest(refusal)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError):
        raise InvalidRequest(refusal) from None
    if moment.tzinfo is None:
        raise InvalidRequest(refusal)
    try:
        utc = moment.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        raise InvalidRequest(refusal) from None
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    if utc < now - timedelta(seconds=1):
        raise InvalidRequest("'send_at' is in the past")
    if utc > now + MAX_SEND_AHEAD:
        raise InvalidRequest(f"'send_at' is more than {MAX_SEND_AHEAD.days} days ahead")
    return utc


class Audience(BaseModel):
    """Who gets the broadcast: listed user ids and phones, and every user carrying one of `tags`.

    A plain model with RequestBody's strictness: the body's own check of its values (NUL, lone
    surrogates, NaN) already walked these lists once; 100,000 entries are not walked twice."""

    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")

    user_ids: Annotated[list[Annotated[str, Field(max_length=MAX_USER_ID_CHARS)]],
                        Field(max_length=MAX_AUDIENCE), AfterValidator(_user_ids),
                        refuse_as(f"'audience.user_ids' must be a list of at most {MAX_AUDIENCE:,} user ids "
                                  f"(strings of 1 to {MAX_USER_ID_CHARS} characters)"),
                        Field(description="your users' ids (PUT /users/<user_id>)")] = []
    phones: Annotated[list[Annotated[str, Field(max_length=40)]], Field(max_length=MAX_AUDIENCE),
                      AfterValidator(_phones),
                      refuse_as(f"'audience.phones' must be a list of at most {MAX_AUDIENCE:,} phone numbers"),
                      Field(description="WhatsApp numbers in E.164 (a number with no user becomes a contact)")] = []
    tags: Annotated[list[str], Field(max_length=MAX_AUDIENCE_TAGS), AfterValidator(check_tags),
                    refuse_as(f"'audience.tags' must be a list of at most {MAX_AUDIENCE_TAGS} tags"),
                    Field(description="every user carrying at least one of these tags")] = []


@dataclass(frozen=True)
class BroadcastRequest:
    """A validated broadcast: the audience, what it says, when."""

    user_ids: tuple[str, ...]
    phones: tuple[str, ...]
    tags: tuple[str, ...]
    template: str | None
    content_sid: str | None
    body: str | None
    subject: str | None
    variables: dict[str, Any]
    channel: str | None
    send_at: str | None
    metadata: dict[str, Any] | None
    #: The request's `quiet_hours` ("" turns them off); None: not given (QUIET_HOURS applies).
    quiet_hours: str | None = None

    def fingerprint(self) -> str:
        """A hash of the normalised request: the same Idempotency-Key with another payload is a 422."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class BroadcastContext:
    """The configuration a broadcast is validated against: WhatsApp templates and email copy."""

    #: TWILIO_CONTENT_SIDS: a name -> one ContentSid, or -> {locale: ContentSid}.
    content_sids: Mapping[str, Any]
    email_templates: frozenset[str] = frozenset()


BroadcastVariable = Annotated[str, Field(max_length=MAX_FLOW_VARIABLE_CHARS), AfterValidator(_variable)] | int | float


class BroadcastBody(RequestBody):
    """POST /broadcasts: an audience and one message (a `template` with `variables`, or a `body`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"audience": {"user_ids": ["123", "124"], "tags": ["vip"]}, "template": "order_update",
         "variables": {"1": "$user.name", "2": 42}, "metadata": {"campaign": "late-opening"}},
    ]})

    audience: Annotated[Audience, Field(description="user ids, phones and tags; together at most "
                                                    f"{MAX_AUDIENCE:,} ids and phones")]
    template: Annotated[Annotated[str, Field(pattern=r"\S", max_length=128)] | None,
                        refuse_as("'template' must be a template name"),
                        Field(description="an approved template's name in TWILIO_CONTENT_SIDS, its HX… "
                                          "ContentSid, or a template with email copy")] = None
    variables: Annotated[dict[str, BroadcastVariable] | None,
                         refuse_as("'variables' must be an object of strings and numbers; a value "
                                   "\"$user.name\" (or user_id, locale, timezone) takes each recipient's own"),
                         Field(description="the template's variables; a value \"$user.<field>\" takes each "
                                           "recipient's own field (name, user_id, locale, timezone); \"$$\" "
                                           "at the start is a literal \"$\"")] = None
    body: Annotated[Annotated[str, Field(max_length=MAX_BODY_CHARS, pattern=r"\S")] | None,
                    refuse_as(f"'body' must be text of at most {MAX_BODY_CHARS} characters"),
                    Field(description="free-form text (WhatsApp: only to users who wrote in the last 24 "
                                      "hours; the others are skipped `window_closed`)")] = None
    subject: Annotated[Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT_CHARS, pattern=r"\S")] | None,
                       refuse_as(f"'subject' must be text of 1 to {MAX_SUBJECT_CHARS} characters"),
                       Field(description="the email's subject (free text by email needs one)")] = None
    channel: Annotated[Literal["whatsapp", "email"] | None,
                       refuse_as("'channel' must be \"whatsapp\" or \"email\""),
                       Field(description="send on this channel only; without it each user's `channels` order "
                                         "decides")] = None
    send_at: Annotated[str | None, refuse_as("'send_at' must be a string (RFC 3339 with an offset)"),
                       Field(description="when to start (RFC 3339 with an offset), at most 35 days ahead; "
                                         "default: now", json_schema_extra={"format": "date-time"})] = None
    metadata: Annotated[dict[str, Any] | None, AfterValidator(_small_metadata), refuse_as(_metadata_refusal),
                        Field(description="your own JSON object (at most 4096 bytes), echoed in every event of "
                                          "the broadcast and its messages")] = None
    quiet_hours: Annotated[str | None, AfterValidator(lambda v: v if v is None else _quiet_hours(v)),
                           refuse_as("'quiet_hours' must be 'HH:MM-HH:MM' or null"),
                           Field(description="hold each recipient's message while it is this time of day in "
                                             "their own timezone (e.g. 21:00-08:00); null: none for this "
                                             "broadcast; absent: QUIET_HOURS")] = None

    _content_sid: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_message(self, info: ValidationInfo) -> Self:
        context = info.context
        if not isinstance(context, BroadcastContext):
            raise TypeError("validate BroadcastBody with context=BroadcastContext(...)")
        audience = self.audience
        if not (audience.user_ids or audience.phones or audience.tags):
            raise InvalidRequest("'audience' names nobody: give 'user_ids', 'phones' or 'tags'")
        if len(audience.user_ids) + len(audience.phones) > MAX_AUDIENCE:
            raise InvalidRequest(f"'audience' lists more than {MAX_AUDIENCE:,} user ids and phones together")
        if (self.template is None) == (self.body is None):
            raise InvalidRequest("a broadcast sends either 'template' (with 'variables') or 'body', exactly one")
        if self.body is not None and self.variables is not None:
            raise InvalidRequest("'variables' only goes with 'template'")
        if self.template is not None:
            if self.template in context.content_sids:
                pass  # the ContentSid in each recipient's locale is chosen while expanding (bot/locales.py)
            elif self.template.startswith("HX") and len(self.template) == 34:
                self._content_sid = self.template
            elif self.template not in context.email_templates:
                known = ", ".join(sorted(set(context.content_sids) | set(context.email_templates))) or "none"
                raise InvalidRequest(f"unknown template {self.template!r}; known templates: {known}")
            if sum(len(str(value)) for value in (self.variables or {}).values()) > MAX_TEMPLATE_VARIABLES_CHARS:
                raise InvalidRequest(f"'variables' exceed WhatsApp's {MAX_TEMPLATE_VARIABLES_CHARS}-character "
                                     "template limit")
        if self.send_at is not None:
            _send_at(self.send_at)
        return self

    def normalised(self) -> BroadcastRequest:
        """The request the route stores (variables as given: references resolve per recipient)."""
        return BroadcastRequest(
            user_ids=tuple(self.audience.user_ids), phones=tuple(self.audience.phones), tags=tuple(self.audience.tags),
            template=self.template, content_sid=self._content_sid, body=self.body, subject=self.subject,
            variables={key: value for key, value in (self.variables or {}).items()}, channel=self.channel,
            send_at=self.send_at, metadata=self.metadata,
            quiet_hours=(self.quiet_hours or "") if "quiet_hours" in self.model_fields_set else None)


def parse_broadcast(payload: Any, content_sids: Mapping[str, str],
                    email_templates: frozenset[str] = frozenset()) -> BroadcastRequest:
    """Validate a decoded JSON payload as a broadcast; InvalidRequest names the field."""
    return validate(BroadcastBody, payload, context=BroadcastContext(content_sids, email_templates)).normalised()


def send_at_utc(value: str | None) -> datetime | None:
    """A validated `send_at` as the naive UTC the database stores."""
    return None if value is None else _send_at(value)
