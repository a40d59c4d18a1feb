"""When a held message may leave (bot/delivery/holding.py): pure, so tested as tables, with the
daylight-saving changes of Europe/Berlin and of America/Sao_Paulo's history (invariant 15)."""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, strategies as st

from bot.delivery.holding import (InvalidQuietHours, QuietHours, first_instant_at, parse_quiet_hours, release_at,
                                  zone)

BERLIN = ZoneInfo("Europe/Berlin")
SAO_PAULO = ZoneInfo("America/Sao_Paulo")
NIGHT = QuietHours(time(21), time(8))


def utc(text: str) -> datetime:
    """A naive UTC instant (the convention of bot/clock.py) from '2026-03-28 21:30'."""
    return datetime.fromisoformat(text)


@pytest.mark.parametrize("text, expected", [
    ("21:00-08:00", QuietHours(time(21), time(8))),
    (" 12:30-14:00 ", QuietHours(time(12, 30), time(14))),
    ("00:00-23:59", QuietHours(time(0), time(23, 59))),
    ("", None),
    ("   ", None),
    (None, None),
])
def test_parse_quiet_hours(text, expected):
    assert parse_quiet_hours(text) == expected


@pytest.mark.parametrize("text", ["21-08", "21:00", "24:00-08:00", "21:60-08:00", "9:00-17:00", "09:00-09:00",
                                  "21:00 - 08:00", "21:00-08:00 x", "abc", "21:00–08:00"])
def test_bad_quiet_hours_are_refused(text):
    with pytest.raises(InvalidQuietHours, match="HH:MM-HH:MM"):
        parse_quiet_hours(text)


@pytest.mark.parametrize("quiet, local, inside", [
    (NIGHT, time(20, 59), False), (NIGHT, time(21), True), (NIGHT, time(23, 59), True), (NIGHT, time(0), True),
    (NIGHT, time(7, 59), True), (NIGHT, time(8), False), (NIGHT, time(12), False),
    (QuietHours(time(12), time(14)), time(11, 59), False), (QuietHours(time(12), time(14)), time(12), True),
    (QuietHours(time(12), time(14)), time(14), False),
])
def test_quiet_hours_are_half_open(quiet, local, inside):
    assert quiet.contains(local) is inside


@pytest.mark.parametrize("now, send_at, quiet, tz, expected", [
    # No schedule, no quiet hours: at once.
    ("2026-12-06 12:00", None, None, "UTC", None),
    # A schedule: its time.
    ("2026-12-06 12:00", "2026-12-07 09:15", None, "UTC", "2026-12-07 09:15"),
    # A schedule in the past (the route refuses one; the function does not hold it).
    ("2026-12-06 12:00", "2026-12-06 11:00", None, "UTC", None),
    # Outside quiet hours in the user's zone: at once (15:00 in Sao Paulo, -03).
    ("2026-12-06 18:00", None, NIGHT, "America/Sao_Paulo", None),
    # Inside them: held until 08:00 there (23:30 UTC is 20:30 in Sao Paulo: not yet quiet)...
    ("2026-12-06 23:30", None, NIGHT, "America/Sao_Paulo", None),
    # ...00:30 UTC is 21:30 in Sao Paulo: held until 08:00 -03 = 11:00 UTC.
    ("2026-12-07 00:30", None, NIGHT, "America/Sao_Paulo", "2026-12-07 11:00"),
    # The same instant in Tokyo (09:30): at once. Each user's own timezone decides.
    ("2026-12-07 00:30", None, NIGHT, "Asia/Tokyo", None),
    # After midnight inside the span: until 08:00 the same day (03:00 Berlin = 02:00 UTC).
    ("2026-12-07 02:00", None, NIGHT, "Europe/Berlin", "2026-12-07 07:00"),
    # A schedule that lands in quiet hours is held past it: 22:00 Berlin -> 08:00 next day.
    ("2026-12-06 12:00", "2026-12-07 21:00", NIGHT, "Europe/Berlin", "2026-12-08 07:00"),
    # A daytime span (12:00-14:00) ends the same day.
    ("2026-12-07 12:30", None, QuietHours(time(12), time(14)), "UTC", "2026-12-07 14:00"),
])
def test_release_at(now, send_at, quiet, tz, expected):
    released = release_at(utc(now), utc(send_at) if send_at else None, quiet, ZoneInfo(tz))
    assert released == (utc(expected) if expected else None)


# ---------------------------------------------------------------- daylight-saving changes

def test_berlin_spring_forward_ends_the_hold_at_eight_summer_time():
    # 2026-03-29: at 02:00 CET (01:00 UTC) Berlin's clocks jump to 03:00 CEST. A message at
    # 22:30 CET on the 28th is held until 08:00 CEST = 06:00 UTC, not 07:00 UTC (08:00 at the
    # evening's +01:00): the night is an hour shorter.
    now = utc("2026-03-28 21:30")
    assert now.replace(tzinfo=timezone.utc).astimezone(BERLIN).hour == 22
    released = release_at(now, None, NIGHT, BERLIN)
    assert released == utc("2026-03-29 06:00")
    assert released.replace(tzinfo=timezone.utc).astimezone(BERLIN).strftime("%H:%M %Z") == "08:00 CEST"
    # One second before, still quiet: released at the same instant; one second after, at once.
    assert release_at(released - timedelta(seconds=1), None, NIGHT, BERLIN) == released
    assert release_at(released, None, NIGHT, BERLIN) is None


def test_berlin_fall_back_ends_the_hold_at_eight_winter_time():
    # 2026-10-25: at 03:00 CEST (01:00 UTC) the clocks go back to 02:00 CET: the night is an hour
    # longer. 22:00 CEST on the 24th -> 08:00 CET = 07:00 UTC (not 06:00).
    released = release_at(utc("2026-10-24 20:00"), None, NIGHT, BERLIN)
    assert released == utc("2026-10-25 07:00")
    assert released.replace(tzinfo=timezone.utc).astimezone(BERLIN).strftime("%H:%M %Z") == "08:00 CET"


def test_an_end_the_clock_skips_ends_the_hold_when_the_clock_jumps():
    # Quiet 22:00-02:30 on 2026-03-28/29: 02:30 never happens in Berlin. The hold ends at the
    # jump (01:00 UTC, 03:00 CEST), the first instant outside the quiet hours.
    quiet = QuietHours(time(22), time(2, 30))
    assert release_at(utc("2026-03-28 22:00"), None, quiet, BERLIN) == utc("2026-03-29 01:00")


def test_sao_paulo_history_spring_forward_at_midnight():
    # 2018-11-04: Sao Paulo's clocks jumped from 00:00 (-03) to 01:00 (-02). Quiet 21:00-08:00
    # from 22:00 -03 on the 3rd (01:00 UTC on the 4th) ends at 08:00 -02 = 10:00 UTC.
    assert release_at(utc("2018-11-04 01:00"), None, NIGHT, SAO_PAULO) == utc("2018-11-04 10:00")
    # Quiet hours ending at midnight, the very minute the clock skipped: released at the jump,
    # 03:00 UTC, when the clock reads 01:00 -02.
    quiet = QuietHours(time(21), time(0))
    assert release_at(utc("2018-11-04 01:00"), None, quiet, SAO_PAULO) == utc("2018-11-04 03:00")


def test_sao_paulo_history_fall_back():
    # 2019-02-17: at 00:00 -02 (02:00 UTC) the clocks went back to 23:00 -03 on the 16th. A
    # message at 23:30 -02 (01:30 UTC) is held until 08:00 -03 = 11:00 UTC, not 10:00.
    assert release_at(utc("2019-02-17 01:30"), None, NIGHT, SAO_PAULO) == utc("2019-02-17 11:00")
    # In the repeated hour's second passing (23:30 -03 = 02:30 UTC) the same end.
    assert release_at(utc("2019-02-17 02:30"), None, NIGHT, SAO_PAULO) == utc("2019-02-17 11:00")


def test_an_end_inside_the_repeated_hour_is_its_first_passing_or_after_the_moment():
    # Berlin 2026-10-25 02:00-03:00 happens twice. Quiet 21:00-02:30: from the evening, the hold
    # ends at the first 02:30 (CEST, 00:30 UTC)...
    quiet = QuietHours(time(21), time(2, 30))
    assert release_at(utc("2026-10-24 20:00"), None, quiet, BERLIN) == utc("2026-10-25 00:30")
    # ...and a message at the second passing's 02:10 CET (01:10 UTC) waits for the second 02:30.
    assert release_at(utc("2026-10-25 01:10"), None, quiet, BERLIN) == utc("2026-10-25 01:30")


def test_zone_falls_back_to_the_default_then_utc():
    assert zone("Asia/Tokyo", "Europe/Berlin") == ZoneInfo("Asia/Tokyo")
    assert zone(None, "Europe/Berlin") == BERLIN
    assert zone("Not/AZone", "Europe/Berlin") == BERLIN
    assert zone(None, "") == timezone.utc


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2037, 12, 31)),
       st.sampled_from(["Europe/Berlin", "America/Sao_Paulo", "Australia/Lord_Howe", "America/New_York",
                        "Asia/Kolkata", "UTC"]),
       st.times(), st.times())
def test_a_released_message_never_lands_inside_quiet_hours_nor_waits_a_day(now, name, start, end):
    start, end = start.replace(second=0, microsecond=0), end.replace(second=0, microsecond=0)
    if start == end:
        return
    quiet, tz = QuietHours(start, end), ZoneInfo(name)
    now = now.replace(microsecond=0)
    released = release_at(now, None, quiet, tz)
    local = now.replace(tzinfo=timezone.utc).astimezone(tz).time()
    if released is None:
        assert not quiet.contains(local)
        return
    assert quiet.contains(local)
    assert now < released <= now + timedelta(hours=25)
    assert not quiet.contains(released.replace(tzinfo=timezone.utc).astimezone(tz).time())
    # The first such instant: a second earlier it was still quiet.
    earlier = released - timedelta(seconds=1)
    assert quiet.contains(earlier.replace(tzinfo=timezone.utc).astimezone(tz).time())


def test_first_instant_at_an_ordinary_time():
    assert first_instant_at(datetime(2026, 7, 1, 8), BERLIN) == utc("2026-07-01 06:00")


# ---------------------------------------------------------------- the settings


@pytest.mark.parametrize("quiet, expected", [("21:00-08:00", "21:00-08:00"), (" 22:30-07:00 ", "22:30-07:00"),
                                             ("", "")])
def test_quiet_hours_setting_is_normalised(quiet, expected):
    from bot.config import load_settings

    assert load_settings({"QUIET_HOURS": quiet}, env_file=None).quiet_hours == expected


@pytest.mark.parametrize("name, value", [("QUIET_HOURS", "9pm-8am"), ("QUIET_HOURS", "08:00-08:00"),
                                         ("DEFAULT_TIMEZONE", "Mars/Olympus_Mons"), ("DEFAULT_TIMEZONE", "")])
def test_a_bad_quiet_hours_or_default_timezone_setting_stops_the_start_naming_it(name, value):
    from bot.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as refused:
        load_settings({name: value}, env_file=None)
    assert name in str(refused.value)


# ---------------------------------------------------------------- the ticks (bot/delivery/ticker.py)


def test_a_tick_is_due_after_its_interval_once_the_last_one_started():
    from bot.delivery.ticker import TICK_LOST_AFTER, Tick

    tick = Tick(task=None, seconds=2.0, priority=0)
    assert tick.due(100.0)  # never enqueued
    tick.enqueued_at = 100.0
    assert not tick.due(101.9)  # the interval has not passed
    assert not tick.due(102.0)  # passed, but the last one has not started: a backlog piles nothing up
    tick.started_at = 101.0
    assert tick.due(102.0)
    tick.enqueued_at, tick.started_at = 200.0, 150.0
    assert not tick.due(200.0 + TICK_LOST_AFTER - 1)
    assert tick.due(200.0 + TICK_LOST_AFTER)  # lost (a flushed queue): enqueued again
