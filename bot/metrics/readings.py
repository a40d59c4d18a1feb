"""What the database and the queue hold right now, read in a few cheap statements.

`GET /metrics` turns these readings into gauges at scrape time, and the dashboard's health strip
shows the same object, so the two can never disagree (docs/metrics.md). Nothing here is kept in
a process: every figure comes from the database or the queue when it is asked for, so one
scrape of any web process tells the state of the whole deployment, worker included
(docs/ARCHITECTURE.md, "Metrics").

Each statement is served by an index (migration 0011_metrics_indexes): the scrape stays under
50 ms with a million messages stored (bench/METRICS.md).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bot.clock import utcnow
from bot.delivery.outbox import Priority, send_priority
from bot.delivery.queue import huey
from bot.models import (FAILED_MESSAGE_STATUSES, LIVE_MESSAGE_STATUSES, UNSENT_MESSAGE_STATUSES, Contact,
                        Conversation, Event, Message)
from bot.vocabulary import OPEN_CONVERSATION, Channel, Direction, EventStatus, Kind

log = logging.getLogger(__name__)

#: Outbound statuses of a message that has not left yet: waiting, being sent, or retrying.
UNSENT = UNSENT_MESSAGE_STATUSES
#: Final failures whose error code is worth a figure of its own.
FAILED = FAILED_MESSAGE_STATUSES
#: Failures are counted by error code over this window (by when they failed): the messages table
#: keeps every message, so an all-time count would grow with it, scrape after scrape.
FAILED_WINDOW = timedelta(hours=24)
#: Statuses a message is still expected to leave: always counted exactly (a partial index holds them).
LIVE = LIVE_MESSAGE_STATUSES
#: Up to this many messages stored (PostgreSQL's own estimate of the table), the other statuses
#: are counted exactly too; beyond, they are estimated from ANALYZE's sample (extended
#: statistics on channel, direction and status: migration 0009), since counting a million rows
#: takes 250 to 600 ms (bench/METRICS.md). SQLite always counts.
EXACT_COUNT_LIMIT = 20_000
#: The extended statistics the estimate reads (pg_stats_ext).
MESSAGE_STATISTICS = "st_messages_channel_direction_status"
#: Event deliveries an operator watches: still to go, and given up on (replayable).
EVENT_BACKLOG = (EventStatus.PENDING, EventStatus.DELIVERING, EventStatus.FAILED)
#: The one receiver of events today (EVENTS_WEBHOOK_URL); the label is kept for more to come.
BACKEND_RECEIVER = "backend"
#: Outbound kinds: every other kind names an inbound message.
OUTBOUND_KINDS = tuple(kind for kind in Kind if kind not in (Kind.INBOUND, Kind.OPT_OUT_REQUEST))


def lane_name(priority: int) -> str:
    """The lane a queue priority stands for ("conversation", "bulk", "email", "broadcast"; the
    broadcasts' pump turns count in "broadcast"; "other" for a priority no lane uses), as the
    metrics and the dashboard name it."""
    if priority == Priority.BROADCAST_PUMP:
        return "broadcast"
    try:
        return Priority(priority).name.lower()
    except ValueError:
        return "other"


#: Every lane, in the queue's order (highest priority first).
LANES = tuple(dict.fromkeys(lane_name(priority) for priority in sorted(Priority, reverse=True)))


@dataclass(frozen=True)
class Readings:
    """The state of the deployment at `read_at`, as `read_readings` found it.

    A part that could not be read (its database or queue unreachable) is left empty and its
    `*_up` flag is False; the figures that could be read are still there.
    """

    read_at: datetime
    #: Whether the database answered (every figure but the queue's comes from it).
    database_up: bool = False
    #: Whether the queue (Redis, or the SQLite queue file) answered.
    queue_up: bool = False
    #: Messages stored, by (channel, direction, status). Statuses in LIVE are exact; the others
    #: are PostgreSQL's estimate when `messages_estimated` (more than EXACT_COUNT_LIMIT stored).
    messages: dict[tuple[str, str, str], int] = field(default_factory=dict)
    messages_estimated: bool = False
    #: Outbound messages failed for good (failed, undelivered) in the last 24 hours (FAILED_WINDOW,
    #: by when they failed), by (channel, error_code); a failure without a code is under "none".
    failed_by_error_code: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Per lane: seconds since the oldest outbound message still to leave (pending, dispatching
    #: or retrying) was created; 0 when none waits. Every lane is present.
    oldest_pending_age_seconds: dict[str, float] = field(default_factory=dict)
    #: Per lane: tasks waiting on the queue (sends, turns, event deliveries alike).
    queue_depth: dict[str, int] = field(default_factory=dict)
    #: Tasks scheduled for later (retries waiting out their delay).
    queue_scheduled: int = 0
    #: Events to the backend by (receiver, status), for pending, delivering and failed.
    events: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Seconds since the oldest event still to deliver was written; 0 when none.
    oldest_event_age_seconds: float = 0.0
    #: Contacts a person is answering now (a handoff not yet over).
    contacts_in_handoff: int = 0
    #: Open conversations (starting or active), by flow.
    conversations_active: dict[str, int] = field(default_factory=dict)

    @property
    def oldest_pending_age(self) -> float:
        """The oldest waiting message's age over all lanes, in seconds (the health strip's figure)."""
        return max(self.oldest_pending_age_seconds.values(), default=0.0)

    def events_waiting(self, receiver: str = BACKEND_RECEIVER) -> int:
        """Events still to deliver (pending or being delivered) to `receiver`."""
        return sum(count for (name, status), count in self.events.items()
                   if name == receiver and status != EventStatus.FAILED)

    def events_failed(self, receiver: str = BACKEND_RECEIVER) -> int:
        """Events whose retries ran out (replayable) for `receiver`."""
        return self.events.get((receiver, EventStatus.FAILED.value), 0)

    def message_count(self, status: str, channel: str | None = None, direction: str = Direction.OUTBOUND) -> int:
        """Messages in `status` (on `channel`, or on every channel)."""
        return sum(count for (chan, dirn, stat), count in self.messages.items()
                   if stat == status and dirn == direction and (channel is None or chan == channel))


def read_readings(session: Session, now: datetime | None = None) -> Readings:
    """Read every figure of `Readings` from the database (through `session`) and the queue.

    Read-only; ends with a rollback so the session holds no transaction (nor, on PostgreSQL, a
    snapshot that would hold back the events' cursor) afterwards. Never raises for an unreachable
    database or queue: the part is flagged down instead.
    """
    now = now or utcnow()
    figures: dict[str, Any] = {"read_at": now}
    try:
        figures.update(_database_figures(session, now), database_up=True)
    except Exception as exc:  # any driver's error: the strip and the scrape still answer
        log.warning("metrics: the database could not be read (%s)", type(exc).__name__)
        figures["oldest_pending_age_seconds"] = {}
    finally:
        try:
            session.rollback()
        except Exception:
            pass
    try:
        depth, scheduled = queue_depth()
        figures.update(queue_depth=depth, queue_scheduled=scheduled, queue_up=True)
    except Exception as exc:
        log.warning("metrics: the queue could not be read (%s)", type(exc).__name__)
    return Readings(**figures)


def _database_figures(session: Session, now: datetime) -> dict[str, Any]:
    # Every figure in one statement (one round trip: under load the waits, not the statements,
    # were most of a scrape's time), then the final statuses, estimated or counted.
    figures: dict[str, list[sa.Row]] = {}
    for row in session.execute(_figures_statement(), {"since": now - FAILED_WINDOW, "now": now}):
        figures.setdefault(row.part, []).append(row)
    messages = {(row.a, row.b, row.c): row.n for row in figures.get("messages", [])}
    estimate = _estimated_final_counts(session)
    if estimate is None:
        messages.update({(channel, direction, status): count for channel, direction, status, count
                         in session.execute(_messages_statement(live=False))})
    else:
        messages.update(estimate)
    failed = {(row.a, "none" if row.b is None else row.b): row.n for row in figures.get("failed", [])}
    oldest = dict.fromkeys(LANES, 0.0)
    for row in figures.get("oldest", []):
        if row.at is not None:
            lane = lane_name(send_priority(row.b, row.a))
            oldest[lane] = max(oldest[lane], max((now - row.at).total_seconds(), 0.0))
    events = {(BACKEND_RECEIVER, row.a): row.n for row in figures.get("events", [])}
    oldest_event = next((row.at for row in figures.get("oldest_event", [])), None)
    handoffs = next((row.n for row in figures.get("handoff", [])), 0)
    conversations: dict[str, int] = {}
    for row in figures.get("conversations", []):
        conversations[row.a] = conversations.get(row.a, 0) + row.n
    return {
        "messages": messages,
        "messages_estimated": estimate is not None,
        "failed_by_error_code": failed,
        "oldest_pending_age_seconds": oldest,
        "events": events,
        "oldest_event_age_seconds": max((now - oldest_event).total_seconds(), 0.0) if oldest_event else 0.0,
        "contacts_in_handoff": int(handoffs or 0),
        "conversations_active": conversations,
    }


def _part(name: str, a: Any = None, b: Any = None, c: Any = None, n: Any = None, at: Any = None) -> list[Any]:
    """One part's columns in the union's shape: (part, a, b, c, n, at); what a part lacks is NULL."""
    def null(value: Any, type_: Any) -> Any:
        # A typed NULL: PostgreSQL resolves a UNION's column types pair by pair, from the left.
        return sa.cast(sa.null(), type_) if value is None else value

    return [sa.literal(name, sa.String).label("part"), null(a, sa.String).label("a"), null(b, sa.String).label("b"),
            null(c, sa.String).label("c"), null(n, sa.BigInteger).label("n"), null(at, sa.DateTime).label("at")]


@functools.cache
def _figures_statement() -> sa.CompoundSelect:
    """Every figure but the final statuses' counts, as (part, a, b, c, n, at) rows. Each part reads
    a partial index of migration 0009 (docs/metrics.md, "What a scrape costs")."""
    # The IN lists are the partial indexes' own predicates, so the planner uses them.
    live = (sa.select(*_part("messages", Message.channel, Message.direction, Message.status, sa.func.count()))
            .where(Message.status.in_(LIVE)).group_by(Message.channel, Message.direction, Message.status))
    failed = (sa.select(*_part("failed", Message.channel, sa.cast(Message.error_code, sa.String), n=sa.func.count()))
              .where(Message.status.in_(FAILED), Message.direction == Direction.OUTBOUND,
                     Message.updated_at >= sa.bindparam("since"))
              .group_by(Message.channel, Message.error_code))
    # One index seek per (channel, kind) on the unsent rows' partial index: a GROUP BY would read
    # every waiting row of a long backlog.
    oldest = [sa.select(*_part("oldest", sa.literal(channel, sa.String), sa.literal(kind, sa.String), at=(
        # A held message (send_at, quiet hours) waits from its time on, not from its creation:
        # one scheduled a week ahead is not a week-old backlog (docs/delivery.md, "Held messages").
        sa.select(sa.func.min(sa.func.coalesce(Message.not_before, Message.created_at)))
        .where(Message.direction == Direction.OUTBOUND, Message.status.in_(UNSENT),
               Message.channel == channel, Message.kind == kind,
               sa.or_(Message.not_before.is_(None), Message.not_before <= sa.bindparam("now")))
        .scalar_subquery())))
        for channel, kind in _LANE_KEYS]
    events = (sa.select(*_part("events", Event.status, n=sa.func.count())).where(Event.status.in_(EVENT_BACKLOG))
              .group_by(Event.status))
    oldest_event = sa.select(*_part("oldest_event", at=sa.func.min(Event.created_at))).where(
        Event.status.in_((EventStatus.PENDING, EventStatus.DELIVERING)))
    handoff = sa.select(*_part("handoff", n=sa.func.count())).where(Contact.handoff_until > sa.bindparam("now"))
    conversations = (sa.select(*_part("conversations", Conversation.flow, n=sa.func.count()))
                     .where(Conversation.status.in_(OPEN_CONVERSATION)).group_by(Conversation.flow))
    return sa.union_all(live, failed, *oldest, events, oldest_event, handoff, conversations)


@functools.cache
def _messages_statement(live: bool) -> sa.Select:
    condition = Message.status.in_(LIVE) if live else Message.status.not_in(LIVE)
    return (sa.select(Message.channel, Message.direction, Message.status, sa.func.count()).where(condition)
            .group_by(Message.channel, Message.direction, Message.status))


_ESTIMATE = sa.text(
    "SELECT s.attnames, s.most_common_vals, s.most_common_freqs, c.reltuples FROM pg_stats_ext s "
    "JOIN pg_class c ON c.relname = s.tablename "
    "JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname "
    "WHERE s.statistics_name = :name")


def _estimated_final_counts(session: Session) -> dict[tuple[str, str, str], int] | None:
    """The final statuses' counts as PostgreSQL estimates them, or None to count them: SQLite,
    a table small enough to count, or no statistics yet (never analysed)."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    row = session.execute(_ESTIMATE, {"name": MESSAGE_STATISTICS}).first()
    if row is None or row.reltuples is None or row.reltuples <= EXACT_COUNT_LIMIT or not row.most_common_vals:
        return None
    columns = list(row.attnames)
    counts: dict[tuple[str, str, str], int] = {}
    for values, frequency in zip(row.most_common_vals, row.most_common_freqs):
        named = dict(zip(columns, values))
        if named.get("status") in LIVE or None in named.values():
            continue
        key = (named["channel"], named["direction"], named["status"])
        counts[key] = counts.get(key, 0) + round(frequency * row.reltuples)
    return counts


#: (channel, kind) of each outbound message the oldest-pending part asks about.
_LANE_KEYS = tuple((channel.value, kind.value) for channel in Channel for kind in OUTBOUND_KINDS)


def queue_depth() -> tuple[dict[str, int], int]:
    """Tasks waiting on the queue per lane, and tasks scheduled for later, over every queue (the
    bulk queue's too, when a broadcast's tasks have one: bot/delivery/queue.py); raises when the
    queue cannot be read. One pipelined round trip per Redis queue; two queries of the SQLite file."""
    depth = dict.fromkeys(LANES, 0)
    scheduled = 0
    for storage in huey.storages():
        scheduled += _storage_depth(storage, depth)
    return depth, scheduled


def _storage_depth(storage: Any, depth: dict[str, int]) -> int:
    """Add one queue's tasks per lane to `depth`; its scheduled tasks."""
    if hasattr(storage, "conn") and hasattr(storage, "queue_key") and hasattr(storage.conn, "pipeline"):
        # huey's priority queue on Redis is a sorted set scored by -priority.
        pipe = storage.conn.pipeline(transaction=False)
        for priority in Priority:
            pipe.zcount(storage.queue_key, -int(priority), -int(priority))
        pipe.zcard(storage.queue_key)
        pipe.zcard(storage.schedule_key)
        *lanes, total, scheduled = pipe.execute()
        for priority, count in zip(Priority, lanes):
            depth[lane_name(priority)] += int(count)
        other = int(total) - sum(int(count) for count in lanes)
        if other:
            depth["other"] = depth.get("other", 0) + other
        return int(scheduled)
    if hasattr(storage, "sql"):  # SQLite: huey's task table carries the priority
        for priority, count in storage.sql("select priority, count(*) from task where queue = ? group by priority",
                                           (storage.name,), results=True):
            lane = lane_name(int(priority))
            depth[lane] = depth.get(lane, 0) + int(count)
        return int(storage.schedule_size())
    depth["other"] = depth.get("other", 0) + int(storage.queue_size())  # another storage: its total only
    return int(storage.schedule_size())
    depth["other"] = int(storage.queue_size())  # another storage: its total only
    return depth, int(storage.schedule_size())
