"""The backend reads and replays its events: GET /events, POST /events/<id>/retry, POST /events/retry.

A backend that was down catches up by polling `GET /events?after=<the last id it saw>`: events come
oldest first, whatever became of their push (invariant 12). The order is `event_delivery.in_order`
and a page holds only final events (`event_delivery.is_final`): an event that commits after a
poll can never sort before what that poll served, so the cursor skips nothing.
"""
from __future__ import annotations


import sqlalchemy as sa
from flask import Blueprint, abort, current_app, jsonify, request

from bot.delivery import event_delivery
from bot.extensions import db
from bot.http.auth import require_api_token
from bot.http.contacts_api import phone_or_400
from bot.http.notify import read_json_body
from bot.http.schemas import InvalidRequest, ReplayBody, validate
from bot.models import Contact, Event, is_public_id
from bot.vocabulary import EventStatus, EventType

bp = Blueprint("events_api", __name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
QUERY_PARAMETERS = frozenset({"after", "type", "status", "contact", "limit"})
#: How many failed events one POST /events/retry replays at most (call again for more).
MAX_REPLAY = 10_000


def _after(value: str | None) -> sa.ColumnElement[bool]:
    """The events after the cursor, in `event_delivery.in_order`."""
    if not value:
        return sa.true()
    if not is_public_id(value):
        abort(400, description="after: an event id (32 hex digits) from an earlier answer")
    position = db.session.execute(sa.select(*event_delivery.in_order()).where(Event.id == value)).one_or_none()
    if position is None:
        abort(400, description="after: no such event (it may have been pruned; start without `after`)")
    return sa.tuple_(*event_delivery.in_order()) > sa.tuple_(*position)


def _choices(name: str, allowed: type[EventType] | type[EventStatus]) -> list[str]:
    values = [v.strip() for v in request.args.get(name, "").split(",") if v.strip()]
    unknown = [v for v in values if v not in set(allowed)]
    if unknown:
        abort(400, description=f"{name}: unknown {unknown[0]!r}; one of {', '.join(allowed)}")
    return values


def _limit() -> int:
    raw = request.args.get("limit", str(DEFAULT_LIMIT))
    # ASCII digits only: str.isdigit() also takes "²" and "①", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        abort(400, description=f"limit: a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


@bp.get("/events")
@require_api_token
def list_events():
    """Events oldest first after a cursor, filtered by type, delivery status and contact."""
    unknown = sorted(set(request.args) - QUERY_PARAMETERS)
    if unknown:  # a typo (`?typ=`) would otherwise silently list everything
        abort(400, description=f"unknown parameter {unknown[0]!r}; allowed: {', '.join(sorted(QUERY_PARAMETERS))}")
    query = (sa.select(Event).where(_after(request.args.get("after")), event_delivery.is_final())
             .order_by(*event_delivery.in_order()))
    types, statuses = _choices("type", EventType), _choices("status", EventStatus)
    if types:
        query = query.where(Event.type.in_(types))
    if statuses:
        query = query.where(Event.status.in_(statuses))
    if request.args.get("contact"):
        phone = phone_or_400(request.args["contact"], field="contact")
        query = query.where(Event.contact_id == sa.select(Contact.id).where(Contact.phone == phone).scalar_subquery())
    limit = _limit()
    rows = db.session.scalars(query.limit(limit + 1)).all()
    page = rows[:limit]
    return jsonify(events=[event.to_dict() for event in page], has_more=len(rows) > limit,
                   next_after=page[-1].id if page else (request.args.get("after") or None))


def _needs_receiver() -> None:
    if not current_app.config.get("EVENTS_WEBHOOK_URL"):
        abort(409, description="EVENTS_WEBHOOK_URL is not set: there is nowhere to deliver to (read GET /events)")


@bp.post("/events/<event_id>/retry")
@require_api_token
def retry_event(event_id: str):
    """Deliver one event again (failed, or already delivered: a receiver that lost it)."""
    event = db.session.scalar(sa.select(Event).where(Event.id == event_id)) if is_public_id(event_id) else None
    if event is None:
        abort(404, description="no such event")
    _needs_receiver()
    try:
        event_delivery.retry(event)
    except event_delivery.InFlight:
        abort(409, description="the event is being delivered right now; replay it once this attempt "
                               "is over (GET /events shows its delivery)")
    db.session.commit()
    return jsonify(id=event.id, status=event.status), 202


@bp.post("/events/retry")
@require_api_token
def retry_failed_events():
    """Deliver again every event that failed since a time: {"since": "2026-12-05T10:00:00Z"}."""
    try:
        since = validate(ReplayBody, read_json_body()).since_utc()
    except InvalidRequest as exc:
        abort(400, description=str(exc))
    _needs_receiver()
    failed = db.session.scalars(
        sa.select(Event).where(Event.status == EventStatus.FAILED, Event.created_at >= since)
        .order_by(*event_delivery.in_order()).limit(MAX_REPLAY)).all()
    retried = 0
    for event in failed:
        try:
            event_delivery.retry(event)
            retried += 1
        except event_delivery.InFlight:  # replayed one by one meanwhile, and already on the wire
            pass
    db.session.commit()
    return jsonify(retried=retried), 202
