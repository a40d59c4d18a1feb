"""When a held message may leave: a scheduled time (`send_at`) and quiet hours in the user's own
timezone (docs/ARCHITECTURE.md, invariant 15: held, never dropped).

Pure code: no Flask, no database, no clock of its own. Every instant in and out is a naive UTC
datetime (bot/clock.py's convention, what the columns store); only the quiet hours are read in
local time, through `zoneinfo`, so a daylight-saving change moves the instant a hold ends, not the
wall-clock time it ends at. `POST /notify` and `POST /broadcasts` call `release_at` with the
recipient's timezone; the message row keeps the answer in `messages.not_before`, and its quiet
hours in `messages.quiet_hours`, which the sender checks again when it sends (`quiet_until`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

#: `HH:MM-HH:MM`, 24-hour clock, e.g. 21:00-08:00 (the quiet hours span midnight when the start
#: is later than the end).
QUIET_HOURS_PATTERN = re.compile(r"\A([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)\Z")
QUIET_HOURS_REFUSAL = "quiet hours must be 'HH:MM-HH:MM' on a 24-hour clock, e.g. 21:00-08:00, start and end different"

#: Twilio schedules a message 5 minutes to 35 days ahead; we hold one up to the same horizon.
MAX_SCHEDULE_AHEAD = timedelta(days=35)


class InvalidQuietHours(ValueError):
    """Not `HH:MM-HH:MM`; the message says what is expected."""


@dataclass(frozen=True)
class QuietHours:
    """A daily span of local wall-clock time, [start, end): 21:00-08:00 spans midnight."""

    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    @property
    def spans_midnight(self) -> bool:
        return self.start > self.end

    def contains(self, local: time) -> bool:
        """Whether wall-clock time `local` is inside the quiet hours (the end itself is not)."""
        if self.spans_midnight:
            return local >= self.start or local < self.end
        return self.start <= local < self.end

    def end_after(self, local: datetime) -> datetime:
        """The wall-clock time (naive) at which the quiet hours containing wall-clock `local` end."""
        end_date = local.date()
        if self.spans_midnight and local.time() >= self.start:
            end_date += timedelta(days=1)
        return datetime.combine(end_date, self.end)


def parse_quiet_hours(text: str | None) -> QuietHours | None:
    """`HH:MM-HH:MM` as QuietHours; None for None or blank text (no quiet hours).

    Raises InvalidQuietHours for anything else, or a span of no length (09:00-09:00)."""
    if text is None or not text.strip():
        return None
    match = QUIET_HOURS_PATTERN.match(text.strip())
    if match is None:
        raise InvalidQuietHours(QUIET_HOURS_REFUSAL)
    start_hour, start_minute, end_hour, end_minute = (int(part) for part in match.groups())
    quiet = QuietHours(time(start_hour, start_minute), time(end_hour, end_minute))
    if quiet.start == quiet.end:
        raise InvalidQuietHours(QUIET_HOURS_REFUSAL)
    return quiet


def zone(name: str | None, default: str) -> tzinfo:
    """The IANA zone `name`, else `default` (DEFAULT_TIMEZONE), else UTC if neither is known."""
    for candidate in (name, default):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ValueError, KeyError, OSError):  # zoneinfo raises ZoneInfoNotFoundError (a KeyError)
                continue
    return timezone.utc


def release_at(now: datetime, send_at: datetime | None, quiet_hours: QuietHours | None,
               tz: tzinfo) -> datetime | None:
    """When a message created at `now` may leave: None if at once, else the instant (naive UTC).

    It leaves at `send_at` (when given and later than now); if that moment falls inside the
    quiet hours in `tz`, it is held until they end there, never dropped: the first instant whose
    wall-clock time in `tz` is the end of the quiet hours or later. So across a daylight-saving
    change the hold ends at the same wall-clock time, a different number of hours later; an end
    the clock skips (spring forward) ends it when the clock jumps past it; an end the clock
    passes twice (fall back) ends it the first time. `now` and `send_at` are naive UTC.
    """
    moment = max(now, send_at) if send_at is not None else now
    if quiet_hours is not None:
        local = _wall(moment, tz)
        if quiet_hours.contains(local.time()):
            moment = max(first_instant_at(quiet_hours.end_after(local), tz, after=moment), moment)
    return moment if moment > now else None


def hold_until(now: datetime, send_at: datetime | None, quiet_hours: QuietHours | None, timezone_name: str | None,
               default_timezone: str) -> datetime | None:
    """`release_at` for a recipient whose timezone is `timezone_name` (their own, else
    `default_timezone`: DEFAULT_TIMEZONE): what POST /notify (and a broadcast, per recipient)
    stores in `messages.not_before`. None: it leaves now."""
    if quiet_hours is None and send_at is None:
        return None
    return release_at(now, send_at, quiet_hours, zone(timezone_name, default_timezone))


@functools.lru_cache(maxsize=256)
def _stored_quiet_hours(text: str) -> QuietHours | None:
    return parse_quiet_hours(text)


def quiet_until(now: datetime, quiet_hours: str, timezone_name: str | None, default_timezone: str) -> datetime | None:
    """At send time: the end of a message's quiet hours (`messages.quiet_hours`, as stored) if
    they cover `now` in the recipient's timezone (`timezone_name`, else `default_timezone`), as
    `release_at` reckons it; None when it may leave now. Text that does not parse (not written by
    this server) holds nothing: a message is never kept back for ever."""
    try:
        quiet = _stored_quiet_hours(quiet_hours)
    except InvalidQuietHours:
        return None
    if quiet is None:
        return None
    return release_at(now, None, quiet, zone(timezone_name, default_timezone))


def _wall(instant: datetime, tz: tzinfo) -> datetime:
    """Naive UTC `instant` as the naive wall-clock time in `tz`."""
    return instant.replace(tzinfo=timezone.utc).astimezone(tz).replace(tzinfo=None)


def _utc(wall: datetime, tz: tzinfo, fold: int) -> datetime:
    return wall.replace(tzinfo=tz, fold=fold).astimezone(timezone.utc).replace(tzinfo=None)


def first_instant_at(wall: datetime, tz: tzinfo, after: datetime | None = None) -> datetime:
    """The first instant (naive UTC), later than `after` if given, at which the clock in `tz`
    reads naive `wall` or later."""
    readings = sorted({_utc(wall, tz, 0), _utc(wall, tz, 1)})
    passings = [instant for instant in readings if _wall(instant, tz) == wall]
    if passings:
        # An ordinary time, or one the clock passes twice (fall back): the first passing after
        # `after` (a moment in the repeated hour's second passing waits for the second).
        later = [instant for instant in passings if after is None or instant > after]
        return later[0] if later else passings[-1]
    # A time the clock skips: the instant it jumps past `wall` lies between the two readings
    # (PEP 495 resolves a skipped time with either offset). Transitions fall on whole seconds.
    first, second = readings[0], readings[-1]
    low, high = 0, int((second - first).total_seconds())  # the clock reads before `wall`, then at or after it
    while high - low > 1:
        middle = (low + high) // 2
        if _wall(first + timedelta(seconds=middle), tz) >= wall:
            high = middle
        else:
            low = middle
    return first + timedelta(seconds=high)
