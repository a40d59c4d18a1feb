"""Events to the backend: the backlog per delivery state, the last delivery errors, and the
replay button (the very action of `POST /events/<id>/retry`: `event_delivery.retry`)."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request

from bot.dashboard.security import safe_next
from bot.delivery import event_delivery
from bot.extensions import db
from bot.models import Event, is_public_id
from bot.vocabulary import EventStatus

bp = Blueprint("events", __name__)

#: How many recent delivery errors and failed events the page lists.
RECENT = 30


@bp.get("/events")
def overview():
    """The backlog per state, the events whose last attempt failed, and the failed ones to replay."""
    counts = dict(db.session.execute(sa.select(Event.status, sa.func.count()).group_by(Event.status)).all())
    backlog = [(status, counts.get(status, 0)) for status in EventStatus]
    erring = db.session.scalars(sa.select(Event).where(Event.last_error.is_not(None))
                                .order_by(Event.seq.desc()).limit(RECENT)).all()
    failed = db.session.scalars(sa.select(Event).where(Event.status == EventStatus.FAILED)
                                .order_by(Event.seq.desc()).limit(RECENT)).all()
    return render_template("dashboard/events.html", backlog=backlog, erring=erring, failed=failed,
                           receiver=bool(current_app.config.get("EVENTS_WEBHOOK_URL")))


@bp.post("/events/<event_id>/replay")
def replay(event_id: str):
    """Deliver one event again, as `POST /events/<id>/retry` does; back to where the button was."""
    back = safe_next(request.form.get("next"), "/dashboard/events")
    event = db.session.scalar(sa.select(Event).where(Event.id == event_id)) if is_public_id(event_id) else None
    if event is None:
        abort(404, description="no such event (it may have been pruned)")
    if not current_app.config.get("EVENTS_WEBHOOK_URL"):
        abort(409, description="EVENTS_WEBHOOK_URL is not set: there is nowhere to deliver events to")
    try:
        event_delivery.retry(event)
    except event_delivery.InFlight:
        abort(409, description="this event is being delivered right now; replay it once this attempt is over")
    db.session.commit()
    flash(f"Event {event.id} ({event.type}) queued for delivery again.")
    return redirect(back)
