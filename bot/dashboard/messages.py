"""The message log (newest first, filtered, keyset pages), a message's whole timeline, and the
failures grouped by error code with their trend over the last 24 hours."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from sqlalchemy.orm import selectinload

from bot.clock import utcnow
from bot.dashboard import error_codes
from bot.extensions import db
from bot.models import Contact, Conversation, EmailEvent, Event, Message, StatusEvent, is_public_id
from bot.phone import InvalidNumber, normalize_e164
from bot.vocabulary import Channel, Direction, MessageStatus
from flows import registry

bp = Blueprint("messages", __name__)

PAGE_SIZE = 50
FAILED = (MessageStatus.FAILED, MessageStatus.UNDELIVERED)
#: The trend's buckets: 24 hours, one an hour.
TREND_HOURS = 24
#: At most this many failures are read to draw the trends (the counts themselves are exact).
TREND_ROWS = 50_000
SPARKS = "▁▂▃▄▅▆▇█"


@dataclass
class LogFilter:
    """The message log's filters, checked; `problems` says what was wrong with the ones refused."""

    values: dict[str, str] = field(default_factory=dict)
    clauses: list[sa.ColumnElement[bool]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_filters(args: Any) -> LogFilter:
    """The log's filters from the query string: status, channel, direction, error_code, flow,
    user, phone. Each bad one is named in `problems` (the page shows them, answering 400)."""
    found = LogFilter()
    for name in ("status", "channel", "direction", "error_code", "flow", "user", "phone"):
        raw = (args.get(name) or "").strip()
        if not raw:
            continue
        found.values[name] = raw
        if len(raw) > 128:
            found.problems.append(f"{name}: at most 128 characters")
            continue
        problem = _add_clause(found, name, raw)
        if problem:
            found.problems.append(problem)
    return found


def _add_clause(found: LogFilter, name: str, raw: str) -> str | None:
    choices = {"status": MessageStatus, "channel": Channel, "direction": Direction}
    if name in choices:
        if raw not in set(choices[name]):
            return f"{name}: one of {', '.join(choices[name])}"
        found.clauses.append(getattr(Message, name) == raw)
    elif name == "error_code":
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            return "error code: a number, like 63016"
        found.clauses.append(Message.error_code == int(raw))
    elif name == "flow":
        if raw not in registry():
            return f"flow: one of {', '.join(registry())}"
        found.clauses.append(Message.conversation_id.in_(sa.select(Conversation.id).where(Conversation.flow == raw)))
    # One contact: its id first, so the page reads ix_messages_contact_created newest first.
    elif name == "user":
        found.clauses.append(Message.contact_id == sa.select(Contact.id).where(Contact.user_id == raw).scalar_subquery())
    elif name == "phone":
        try:
            phone = normalize_e164(raw)
            found.clauses.append(Message.contact_id == sa.select(Contact.id).where(Contact.phone == phone).scalar_subquery())
        except InvalidNumber as exc:
            return f"phone: {exc} (an international number, like +15551234567)"
    return None


def _cursor(message: Message) -> str:
    return f"{message.created_at.isoformat()}~{message.id}"


def _after_cursor(raw: str) -> sa.ColumnElement[bool] | None:
    """Rows older than the cursor (created_at, id), newest first; None when it does not parse."""
    stamp, _, message_id = raw.partition("~")
    try:
        created = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if not is_public_id(message_id):
        return None
    return sa.or_(Message.created_at < created, sa.and_(Message.created_at == created, Message.id < message_id))


@bp.get("/")
def log():
    """The message log, newest first, PAGE_SIZE a page (keyset: `before` is the last row's place)."""
    filters = parse_filters(request.args)
    query = sa.select(Message).options(selectinload(Message.contact))
    before = request.args.get("before", "")
    if before:
        after = _after_cursor(before[:200])
        if after is None:
            filters.problems.append("before: not a page position from this log (start again from the first page)")
        else:
            query = query.where(after)
    if filters.problems:
        return render_template("dashboard/log.html", rows=[], filters=filters, next_cursor=None,
                               statuses=list(MessageStatus), channels=list(Channel), flows=list(registry())), 400
    rows = db.session.scalars(query.where(*filters.clauses)
                              .order_by(Message.created_at.desc(), Message.id.desc()).limit(PAGE_SIZE + 1)).all()
    page = rows[:PAGE_SIZE]
    flows = _flows_of(page)
    return render_template("dashboard/log.html", rows=page, flows_by_conversation=flows, filters=filters,
                           next_cursor=_cursor(page[-1]) if len(rows) > PAGE_SIZE else None,
                           statuses=list(MessageStatus), channels=list(Channel), flows=list(registry()))


def _flows_of(messages: list[Message]) -> dict[str, str]:
    ids = {m.conversation_id for m in messages if m.conversation_id}
    if not ids:
        return {}
    return dict(db.session.execute(sa.select(Conversation.id, Conversation.flow).where(Conversation.id.in_(ids))).all())


@dataclass(frozen=True)
class Moment:
    """One line of a message's timeline."""

    at: datetime | None
    what: str
    detail: str = ""
    error_code: int | None = None
    event: Event | None = None
    link: str | None = None


@bp.get("/messages/<message_id>")
def message(message_id: str):
    """One message and everything that happened to it, in time order."""
    row = db.session.scalar(sa.select(Message).options(selectinload(Message.contact)).where(Message.id == message_id)) \
        if is_public_id(message_id) else None
    if row is None:
        abort(404, description="no such message")
    conversation = db.session.get(Conversation, row.conversation_id) if row.conversation_id else None
    fallback = db.session.scalar(sa.select(Message).where(Message.fallback_of == row.id))
    return render_template("dashboard/message.html", message=row, conversation=conversation, fallback=fallback,
                           receiver=bool(current_app.config.get("EVENTS_WEBHOOK_URL")),
                           timeline=timeline(row, fallback), explanation=error_codes.explain(row.error_code),
                           error_page=error_codes.error_page(row.error_code))


def timeline(row: Message, fallback: Message | None) -> list[Moment]:
    """Every callback, the attempts, every event pushed about it and the fallback, oldest first."""
    moments = [Moment(row.created_at, "received" if row.direction == Direction.INBOUND else "created",
                      f"{row.kind} on {row.channel}" + (f", in {row.locale}" if row.locale else ""))]
    if row.fallback_of:
        moments.append(Moment(row.created_at, "fallback of an earlier message", link=url_for(
            "dashboard.messages.message", message_id=row.fallback_of)))
    if row.attempts:
        moments.append(Moment(row.attempt_started_at, f"attempt {row.attempts} started",
                              f"{row.attempts} attempt{'s' if row.attempts != 1 else ''} in all"
                              + (f"; next try at {row.next_attempt_at:%Y-%m-%d %H:%M:%S}" if row.status
                                 == MessageStatus.RETRYING and row.next_attempt_at else "")))
    if row.unsure_since:
        moments.append(Moment(row.unsure_since, "fate unknown", "the provider is asked before any new attempt"))
    if row.sent_at:
        moments.append(Moment(row.sent_at, "accepted by the provider",
                              row.twilio_sid or row.provider_message_id or ""))
    history = EmailEvent if row.channel == Channel.EMAIL else StatusEvent
    for callback in db.session.scalars(sa.select(history).where(history.message_id == row.id).order_by(history.id)):
        if isinstance(callback, EmailEvent):
            moments.append(Moment(callback.received_at, f"SendGrid: {callback.event}", callback.reason or ""))
        else:
            moments.append(Moment(callback.received_at, f"Twilio callback: {callback.status}",
                                  callback.error_message or "", error_code=callback.error_code))
    for event in db.session.scalars(sa.select(Event).where(Event.message_id == row.id).order_by(Event.seq)):
        moments.append(Moment(event.created_at, f"event {event.type}",
                              f"delivery {event.status}, {event.attempts} attempt(s)"
                              + (f", last error: {event.last_error}" if event.last_error else ""), event=event))
    if fallback is not None:
        moments.append(Moment(fallback.created_at, f"fallback on {fallback.channel}", fallback.status,
                              link=url_for("dashboard.messages.message", message_id=fallback.id)))
    # To the second, then in the order a message lives (created, attempt, accepted, callbacks,
    # events, fallback): an event is written microseconds before the change it reports is flushed.
    order = {id(moment): n for n, moment in enumerate(moments)}
    return sorted(moments, key=lambda moment: ((moment.at or datetime.min).replace(microsecond=0),
                                               order[id(moment)]))


@bp.get("/sid/<sid>")
def by_provider_id(sid: str):
    """The message Twilio knows by this SID (the chat in development mode links here)."""
    if not (sid.isascii() and sid.isalnum() and len(sid) <= 128):
        abort(404, description="no such message")
    found = db.session.scalar(sa.select(Message.id).where(
        sa.or_(Message.twilio_sid == sid, Message.provider_message_id == sid)))
    if found is None:
        abort(404, description="no message with this provider id (yet)")
    return redirect(url_for("dashboard.messages.message", message_id=found))


@dataclass
class FailureGroup:
    """The failures of one channel with one error code over the last 24 hours."""

    channel: str
    error_code: int | None
    count: int
    last_error_message: str | None = None
    trend: list[int] = field(default_factory=lambda: [0] * TREND_HOURS)

    @property
    def explanation(self) -> error_codes.Explanation | None:
        return error_codes.explain(self.error_code)

    @property
    def page(self) -> str | None:
        return error_codes.error_page(self.error_code) if self.channel == Channel.WHATSAPP else None

    @property
    def sparkline(self) -> str:
        """The hourly counts as bars, oldest hour first (text: no script, no inline style)."""
        top = max(self.trend) or 1
        return "".join(SPARKS[0] if n == 0 else SPARKS[max(1, round(n * (len(SPARKS) - 1) / top))]
                       for n in self.trend)


def failure_groups(now: datetime | None = None) -> list[FailureGroup]:
    """Outbound messages that failed for good (failed, undelivered) in the last 24 hours, by
    channel and error code, most frequent first, each with its hourly trend. "When" is the row's
    last change (`updated_at`), as /metrics counts its failures of the last 24 hours."""
    now = now or utcnow()
    since = now - timedelta(hours=TREND_HOURS)
    failed = sa.and_(Message.updated_at >= since, Message.direction == Direction.OUTBOUND, Message.status.in_(FAILED))
    groups = {(channel, code): FailureGroup(channel, code, count) for channel, code, count in db.session.execute(
        sa.select(Message.channel, Message.error_code, sa.func.count()).where(failed)
        .group_by(Message.channel, Message.error_code))}
    last_text: dict[tuple[str, int | None], str | None] = {}
    hours: dict[tuple[str, int | None], Counter[int]] = defaultdict(Counter)
    for channel, code, failed_at, text in db.session.execute(
            sa.select(Message.channel, Message.error_code, Message.updated_at, Message.error_message).where(failed)
            .order_by(Message.updated_at.desc()).limit(TREND_ROWS)):
        last_text.setdefault((channel, code), text)
        age = int(max((now - failed_at).total_seconds(), 0) // 3600)
        hours[(channel, code)][TREND_HOURS - 1 - min(age, TREND_HOURS - 1)] += 1
    for key, group in groups.items():
        group.last_error_message = last_text.get(key)
        group.trend = [hours[key][hour] for hour in range(TREND_HOURS)]
    return sorted(groups.values(), key=lambda group: (-group.count, group.channel, group.error_code or 0))


@bp.get("/failures")
def failures():
    """Failures grouped by error code, explained, with Twilio's page and the 24 h trend."""
    return render_template("dashboard/failures.html", groups=failure_groups())
