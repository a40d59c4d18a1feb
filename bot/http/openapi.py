"""GET /openapi.json: the backend API described as OpenAPI 3.1, generated from the request models.

Request bodies are the pydantic models that validate them (bot/http/schemas.py), so the
description cannot drift from what is enforced; the answers are described by the response models
below, which the schema-driven fuzz test (tests/http/test_openapi.py) checks every answer against. The
paths table is written out here: ten routes do not need a framework that owns the routing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from bot.http.notify import MAX_IDEMPOTENCY_KEY
from bot.http.events_api import DEFAULT_LIMIT, MAX_LIMIT
from bot.http.broadcast_schema import BroadcastBody
from bot.http.schemas import ConsentBody, HandoffBody, NotifyBody, ReplayBody, UserBody
from bot.vocabulary import (BroadcastState, Channel, Consent, ConversationStatus, EventStatus, EventType, HoldReason,
                            MessageStatus)

bp = Blueprint("openapi", __name__)


# ---------------------------------------------------------------- what the routes answer


class Answer(BaseModel):
    """A model of what a route answers: it describes, it validates nothing the web receives.

    Its validator and serializer are built when the document is first asked for (`defer_build`),
    not in every web process at start, for a route a backend reads once (0.2 MiB of each web
    process: bench/THROUGHPUT.md, "Web memory"); the document is the same."""

    model_config = ConfigDict(defer_build=True)


class Error(Answer):
    """Every refusal: `error` says what is wrong (for a 400, which field and why)."""

    error: str
    templates: list[str] | None = Field(None, description="with a 422 outside the 24-hour window: the "
                                                          "configured templates to send instead")
    skipped: dict[str, str] | None = Field(None, description="with a 409 or 422 for a user: why each channel "
                                                             "could not carry the message")
    template: str | None = Field(None, description="with a 400 for a template in none of the recipient's "
                                                   "languages: the template")
    locale: str | None = Field(None, description="with that 400: the recipient's locale (null: none stored, "
                                                 "so the default applied)")


class MessageAccepted(Answer):
    """202 from POST /notify for a message (Location: its GET /messages/<id>)."""

    id: str
    status: MessageStatus
    channel: Channel
    user_id: str | None = Field(description="your user's id, when the message went to a user")
    to: str = Field(description="the phone number (WhatsApp) or email address the message goes to")
    created_at: str | None
    url: str
    send_at: str | None = Field(None, description="the time asked for with `send_at` (UTC)")
    held_until: str | None = Field(None, description="held in the database until then (UTC): its `send_at`, or "
                                                     "the end of the quiet hours in the user's timezone; null: "
                                                     "it leaves now")
    held_reason: HoldReason | None = Field(None, description="why it is held: `scheduled` or `quiet_hours`")
    locale: str | None = Field(None, description="the locale the message's copy was resolved to (the user's "
                                                 "locale, its language or DEFAULT_LOCALE); null for your own text")


class CancelRefused(Answer):
    """409 from POST /messages/<id>/cancel: too late, the message left or is leaving."""

    error: str
    id: str
    status: MessageStatus


class ConversationAccepted(Answer):
    """202 from POST /notify for a flow (Location: its GET /conversations/<id>)."""

    id: str
    status: ConversationStatus
    to: str
    flow: str
    created_at: str | None
    url: str
    send_at: str | None = Field(None, description="the start time asked for with `send_at` (UTC)")
    held_until: str | None = Field(None, description="held in the database until then (UTC): its `send_at`, or "
                                                     "the end of the quiet hours in the user's timezone; null: "
                                                     "it starts now")
    held_reason: HoldReason | None = Field(None, description="why it waits: `scheduled` or `quiet_hours`")


class ConversationCancelRefused(Answer):
    """409 from POST /conversations/<id>/cancel: too late, the flow started or ended."""

    error: str
    id: str
    status: ConversationStatus


class StatusEvent(Answer):
    """One status callback from Twilio."""

    status: str
    error_code: int | None
    error_message: str | None
    received_at: str | None


class Message(Answer):
    """GET /messages/<id>: a message, its status and every status callback so far."""

    model_config = ConfigDict(populate_by_name=True)

    id: str
    direction: str
    kind: str | None
    conversation_id: str | None
    channel: Channel
    user_id: str | None = Field(description="your user's id, when the message is a user's")
    to: str | None
    from_: str | None = Field(alias="from")
    subject: str | None = Field(description="the email's subject")
    fallback_of: str | None = Field(description="the message this one replaces on another channel")
    fallback: str | None = Field(description="the message that replaced this one on another channel")
    status: MessageStatus
    error_code: int | None = Field(description="Twilio's error code (also 21610 and 63016 when the "
                                               "server refuses to send itself)")
    error_message: str | None
    twilio_sid: str | None
    provider_message_id: str | None = Field(description="the email provider's id (SendGrid's X-Message-Id)")
    body: str | None
    template: str | None
    variables: dict[str, Any] | None
    media_urls: list[str]
    attempts: int
    metadata: dict[str, Any] | None = Field(description="the object the backend sent with POST /notify")
    created_at: str | None
    updated_at: str | None
    sent_at: str | None
    broadcast_id: str | None = Field(None, description="the broadcast this message is one recipient's copy of")
    send_at: str | None = Field(description="the time asked for with POST /notify `send_at` (UTC)")
    held_until: str | None = Field(description="while held in the database: when it will leave (UTC)")
    held_reason: HoldReason | None = Field(description="why it is held: `scheduled` or `quiet_hours`")
    locale: str | None = Field(None, description="the locale its copy was resolved to when it was made (the "
                                                 "ContentSid's, the email's, a flow reply's); null for text you "
                                                 "wrote or a ContentSid you named")
    events: list[StatusEvent] | None = None


class Conversation(Answer):
    """GET /conversations/<id>: a flow's run with one contact, and what the contact answered."""

    id: str
    contact: str
    flow: str
    state: str | None
    status: ConversationStatus
    outcome: dict[str, Any] | None
    data: dict[str, Any] | None
    started_by: str
    metadata: dict[str, Any] | None = None
    error: str | None
    started_at: str | None
    updated_at: str | None
    expires_at: str | None
    ended_at: str | None
    send_at: str | None = Field(None, description="a backend-started flow's start time asked for (UTC)")
    held_until: str | None = Field(None, description="while held in the database: when it starts (UTC)")
    held_reason: HoldReason | None = Field(None, description="why it waits: `scheduled` or `quiet_hours`")
    quiet_hours: str | None = Field(None, description="the quiet hours its first messages are held by (null: none)")


class ConsentEvent(Answer):
    """One entry of the consent ledger."""

    action: str
    previous: str
    source: str
    words: str | None
    message_sid: str | None
    at: str | None


class Contact(Answer):
    """GET /contacts/<phone>: consent, its ledger and the latest conversations."""

    phone: str
    profile_name: str | None
    consent: Consent
    last_inbound_at: str | None
    consent_history: list[ConsentEvent]
    conversations: list[Conversation]


class EventDelivery(Answer):
    """How an event's push to EVENTS_WEBHOOK_URL went."""

    status: EventStatus
    attempts: int
    last_error: str | None
    next_attempt_at: str | None
    delivered_at: str | None


class Event(Answer):
    """One event (docs/api.md, "Events to your backend"): the pushed body, its id, its delivery."""

    id: str = Field(description="the webhook-id header of every push of this event")
    type: EventType
    timestamp: str | None
    data: dict[str, Any]
    delivery: EventDelivery


class EventPage(Answer):
    """GET /events: oldest first; pass `next_after` as `after` while `has_more`."""

    events: list[Event]
    has_more: bool
    next_after: str | None


class EventReplay(Answer):
    """202 from POST /events/<id>/retry."""

    id: str
    status: EventStatus


class EventsReplayed(Answer):
    """202 from POST /events/retry."""

    retried: int


class Handoff(Answer):
    """POST / DELETE /contacts/<phone>/handoff: whether a person answers the contact, until when."""

    phone: str
    handoff: bool
    until: str | None
    reason: str | None


# ---------------------------------------------------------------- the paths table


class UserConsent(Answer):
    """Consent per channel: STOP on WhatsApp and an email unsubscribe are separate (invariant 14)."""

    whatsapp: Consent
    email: Consent


class User(Answer):
    """A user by your own id (PUT /users/<user_id>)."""

    user_id: str
    phone: str | None
    email: str | None
    name: str | None
    locale: str | None
    timezone: str | None
    channels: list[Channel] = Field(description="the order of channels to try")
    consent: UserConsent
    tags: list[str] = Field(description="the user's tags (a broadcast's audience may name them)")
    created_at: str | None
    updated_at: str | None


class BroadcastAccepted(Answer):
    """202 from POST /broadcasts (Location: its GET /broadcasts/<id>): stored, not yet expanded."""

    id: str
    state: BroadcastState
    targets: int = Field(description="user ids and phones listed (tags are resolved by the worker)")
    tags: list[str]
    url: str


class ChannelCounts(Answer):
    """A broadcast's messages on one channel."""

    queued: int
    sent: int
    delivered: int
    read: int
    failed: int
    canceled: int


class BroadcastCounts(Answer):
    """GET /broadcasts/<id> (and POST …/cancel): a broadcast's state and counts so far."""

    id: str
    state: BroadcastState
    recipients: int = Field(description="people it messages: resolved, deduplicated, not skipped")
    skipped: dict[str, int] = Field(description="audience entries never messaged, by reason (opted_out, handoff, "
                                                "duplicate, unknown_user, invalid_phone, missing_user_field, "
                                                "no_template_for_locale, window_closed, no_address, ...)")
    queued: int = Field(description="recipients whose message has not left yet (held for quiet hours included)")
    sent: int = Field(description="messages a provider accepted and that have not failed since")
    delivered: int = Field(description="delivered or read")
    read: int
    failed: dict[str, int] = Field(description="failed or undelivered messages by error code")
    canceled: int = Field(description="messages a cancel stopped before they left")
    by_channel: dict[str, ChannelCounts]
    targets: int
    tags: list[str]
    template: str | None
    body: str | None
    channel: Channel | None
    metadata: dict[str, Any] | None
    send_at: str | None
    created_at: str | None
    ended_at: str | None


@dataclass(frozen=True)
class Operation:
    """One route as a backend calls it: what it takes and what it may answer."""

    method: str
    path: str  # OpenAPI style: /messages/{message_id}
    summary: str
    answers: dict[int, tuple[str, type[BaseModel] | None]]
    body: type[BaseModel] | None = None
    headers: list[dict[str, Any]] = field(default_factory=list)
    query: list[dict[str, Any]] = field(default_factory=list)
    #: POST routes whose body may be left out (an empty request means all defaults).
    body_optional: bool = False
    #: The security scheme: the backend's token, or `metrics` (GET /metrics has its own token).
    security: str = "bearer"
    #: The 200 answer is Prometheus's text format, not JSON (GET /metrics).
    text: bool = False


PHONE = {"name": "phone", "in": "path", "required": True, "description": "E.164, e.g. +15551234567",
         "schema": {"type": "string"}, "example": "+15551234567"}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "description": "the same key returns the first answer; with a different payload, 422",
                   "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY}}
UNAUTHORIZED = (401, ("missing or invalid bearer token", Error))
NO_RECEIVER = (409, ("EVENTS_WEBHOOK_URL is not set: nowhere to deliver to", Error))


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


EVENT_FILTERS = [
    _query("after", "an event id from an earlier page: only events after it (empty: from the start)",
           {"type": "string", "pattern": "^([0-9a-f]{32})?$"}),
    _query("type", "comma-separated event types", {"type": "string"}),
    _query("status", "comma-separated delivery statuses", {"type": "string"}),
    _query("contact", "a contact's number, E.164", {"type": "string"}),
    _query("limit", f"events per page, default {DEFAULT_LIMIT}",
           {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
]
TOO_LARGE = (413, ("the body is larger than MAX_CONTENT_LENGTH", Error))

OPERATIONS = [
    Operation("post", "/notify", "Queue a WhatsApp message, or start a conversation flow", body=NotifyBody,
              headers=[IDEMPOTENCY_KEY], answers=dict([
                  (202, ("queued (a replay of the same Idempotency-Key has Idempotent-Replayed: true)", None)),
                  (400, ("a field is wrong; `error` says which and why; or the template has no copy in the "
                         "recipient's locale, its language or DEFAULT_LOCALE (`template`, `locale`)", Error)),
                  UNAUTHORIZED, (404, ("no such user: a `user_id` never stored, sent without `user`", Error)),
                  (409, ("the contact opted out; or, for a flow, a person is handling the contact (handoff)", Error)),
                  TOO_LARGE,
                  (415, ("Content-Type is not application/json", Error)),
                  (422, ("free-form outside the 24-hour window, or an Idempotency-Key reused with another "
                         "payload", Error))])),
    Operation("get", "/messages/{message_id}", "A message's status, error code and status callbacks",
              answers=dict([(200, ("the message", Message)), UNAUTHORIZED, (404, ("no such message", Error))])),
    Operation("post", "/messages/{message_id}/cancel", "Cancel a message that has not left (e.g. a scheduled one)",
              answers=dict([(200, ("the message, now canceled (also when it already was)", Message)), UNAUTHORIZED,
                            (404, ("no such outbound message", Error)),
                            (409, ("too late: it is being sent, left already, or failed", CancelRefused))])),
    Operation("get", "/conversations/{conversation_id}", "A conversation's flow, status and outcome",
              answers=dict([(200, ("the conversation", Conversation)), UNAUTHORIZED,
                            (404, ("no such conversation", Error))])),
    Operation("post", "/conversations/{conversation_id}/cancel",
              "Cancel a backend-started flow that has not started (e.g. a scheduled one)",
              answers=dict([(200, ("the conversation, now cancelled (also when you already canceled it)",
                                   Conversation)), UNAUTHORIZED,
                            (404, ("no such conversation", Error)),
                            (409, ("too late: it started or ended", ConversationCancelRefused))])),
    Operation("get", "/contacts/{phone}", "A contact's consent, its ledger and recent conversations",
              answers=dict([(200, ("the contact", Contact)), (400, ("not a phone number", Error)), UNAUTHORIZED,
                            (404, ("no such contact", Error))])),
    Operation("put", "/contacts/{phone}/consent", "Record consent the backend collected elsewhere",
              body=ConsentBody,
              answers=dict([(200, ("the contact, with the new ledger entry", Contact)),
                            (400, ("a field, or the phone number, is wrong", Error)), UNAUTHORIZED,
                            (404, ("not a path of this API (e.g. a phone number with a slash)", Error)),
                            TOO_LARGE])),
    Operation("put", "/users/{user_id}", "Store a user by your own id: omitted fields kept, null clears",
              body=UserBody,
              answers=dict([(200, ("the user, updated", User)), (201, ("the user, created", User)),
                            (400, ("a field, or the user id, is wrong", Error)), UNAUTHORIZED,
                            (404, ("not a path of this API (e.g. an id with a slash)", Error)),
                            (409, ("the phone or email belongs to another user", Error)), TOO_LARGE])),
    Operation("get", "/users/{user_id}", "A user, with consent per channel",
              answers=dict([(200, ("the user", User)), (400, ("the user id is wrong", Error)), UNAUTHORIZED,
                            (404, ("no such user", Error))])),
    Operation("post", "/broadcasts", "Send one message to many: user ids, phones and tags (202 at once)",
              body=BroadcastBody, headers=[IDEMPOTENCY_KEY],
              answers=dict([(202, ("stored; the worker expands and sends it (a replay of the same "
                                   "Idempotency-Key has Idempotent-Replayed: true)", BroadcastAccepted)),
                            (400, ("a field is wrong; `error` says which and why", Error)), UNAUTHORIZED,
                            (413, ("the body is larger than 8 MB", Error)),
                            (415, ("Content-Type is not application/json", Error)),
                            (422, ("an Idempotency-Key reused with another payload", Error))])),
    Operation("get", "/broadcasts/{broadcast_id}", "A broadcast's state and counts",
              answers=dict([(200, ("the broadcast", BroadcastCounts)), UNAUTHORIZED,
                            (404, ("no such broadcast", Error))])),
    Operation("post", "/broadcasts/{broadcast_id}/cancel", "Stop a broadcast: nothing more leaves",
              answers=dict([(200, ("canceled (or already canceled): the counts of what left", BroadcastCounts)),
                            UNAUTHORIZED, (404, ("no such broadcast", Error)),
                            (409, ("the broadcast already completed", Error))])),
    Operation("get", "/events", "Events oldest first, after a cursor, filtered by type, delivery status, contact",
              query=EVENT_FILTERS,
              answers=dict([(200, ("a page of events", EventPage)), (400, ("a filter is wrong", Error)),
                            UNAUTHORIZED])),
    Operation("post", "/events/{event_id}/retry", "Deliver one event again",
              answers=dict([(202, ("queued for delivery", EventReplay)), UNAUTHORIZED,
                            (404, ("no such event", Error)),
                            (409, ("EVENTS_WEBHOOK_URL is not set, or the event is being delivered right now", Error))])),
    Operation("post", "/events/retry", "Deliver again every event that failed since a time", body=ReplayBody,
              answers=dict([(202, ("how many were queued", EventsReplayed)), (400, ("`since` is wrong", Error)),
                            UNAUTHORIZED, NO_RECEIVER, TOO_LARGE])),
    Operation("post", "/contacts/{phone}/handoff", "A person takes over the contact: the bot pauses",
              body=HandoffBody, body_optional=True,
              answers=dict([(200, ("the handoff", Handoff)), (400, ("a field, or the phone number, is wrong", Error)),
                            UNAUTHORIZED, (404, ("not a path of this API", Error)), TOO_LARGE])),
    Operation("delete", "/contacts/{phone}/handoff", "Give the contact back to the bot",
              answers=dict([(200, ("the contact, no longer in a handoff", Handoff)),
                            (400, ("not a phone number", Error)), UNAUTHORIZED, (404, ("no such contact", Error))])),
    Operation("get", "/metrics", "Prometheus metrics, the whole deployment in one scrape (docs/metrics.md)",
              security="metrics", text=True,
              answers=dict([(200, ("the Prometheus text format", None)),
                            (401, ("missing or invalid METRICS_TOKEN (bearer, or basic auth's password)", Error)),
                            (404, ("METRICS_TOKEN is not set: metrics are off", Error))])),
]


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [PHONE if name == "phone" else {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in names]


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(operation: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (description, model) in operation.answers.items():
        if operation.text and status == 200:
            responses["200"] = {"description": description,
                                "content": {"text/plain": {"schema": {"type": "string"}}}}
            continue
        if status == 202 and model is None:  # a message or a conversation, by what was asked
            schema: dict[str, Any] = {"oneOf": [_ref(MessageAccepted), _ref(ConversationAccepted)]}
        else:
            schema = _ref(model)
        responses[str(status)] = {"description": description, "content": _content(schema)}
    # Every route behind the token answers 503 while the database is unreachable (bot/http/errors.py);
    # /metrics answers 200 then, with bot_up{dependency="database"} 0.
    if operation.security == "bearer":
        responses.setdefault("503", {"description": "the database is unreachable: retry after `Retry-After` seconds",
                                     "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                                     "content": _content(_ref(Error))})
    described: dict[str, Any] = {
        "summary": operation.summary,
        "operationId": f"{operation.method}_{operation.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "security": [{operation.security: []}],
        "parameters": _path_parameters(operation.path) + operation.headers + operation.query,
        "responses": responses,
    }
    if operation.body is not None:
        described["requestBody"] = {"required": not operation.body_optional, "content": _content(_ref(operation.body))}
    return described


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once: it depends on code, not on configuration)."""
    bodies = (NotifyBody, ConsentBody, HandoffBody, ReplayBody, UserBody, BroadcastBody)
    models = [*bodies, Error, MessageAccepted, ConversationAccepted, Message, Conversation, Contact, EventPage,
              EventReplay, EventsReplayed, Handoff, User, BroadcastAccepted, BroadcastCounts, CancelRefused,
              ConversationCancelRefused]
    # Request bodies as they are validated, answers as they are serialised (`from`, not `from_`).
    _, schemas = models_json_schema(
        [(model, "validation" if model in bodies else "serialization") for model in models],
        ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method] = _operation(operation)
    return {
        "openapi": "3.1.0",
        "info": {"title": "WhatsApp bot server: backend API", "version": _version(),
                 "description": "Send WhatsApp notifications, start conversation flows and read what "
                                "happened. Every answer is JSON; every refusal has an `error`."},
        "paths": paths,
        "components": {"schemas": schemas["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "Authorization: Bearer $NOTIFY_API_TOKEN"},
                                           "metrics": {"type": "http", "scheme": "bearer",
                                                       "description": "Authorization: Bearer $METRICS_TOKEN (or "
                                                                      "basic auth with it as the password)"}}},
    }


def _version() -> str:
    try:
        return version("whatsapp-bot-server")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0.0.0"


@bp.get("/openapi.json")
def openapi_json():
    """The OpenAPI document; public, like /healthz: it holds no data, only the API's shape."""
    return jsonify(document())
