"""The health strip on every page: database, queue, the oldest message waiting to leave, the
events backlog. The figures are `bot.metrics.readings`'s, the very object `GET /metrics` turns
into gauges, so the strip and the scrape never disagree (docs/dashboard.md)."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from bot.extensions import db
from bot.metrics.readings import Readings, read_readings


#: Seconds a message may wait to leave before the strip shows it in red: the sweep re-enqueues
#: a lost one within a minute or two, so five minutes means something is stuck.
WAITING_TOO_LONG = 300


@dataclass(frozen=True)
class Health:
    """What the strip shows, from one reading."""

    readings: Readings

    @property
    def database(self) -> str:
        return "up" if self.readings.database_up else "unreachable"

    @property
    def queue(self) -> str:
        if not self.readings.queue_up:
            return "unreachable"
        return f"{sum(self.readings.queue_depth.values())} waiting"

    @property
    def oldest_waiting(self) -> str:
        """The oldest outbound message still to leave, over every lane, as "4 s", "3 min", "2 h"."""
        return age_text(self.readings.oldest_pending_age) if self.readings.database_up else "?"

    @property
    def events(self) -> str:
        if not self.readings.database_up:
            return "?"
        return f"{self.readings.events_waiting()} waiting, {self.readings.events_failed()} failed"

    @property
    def worrying(self) -> set[str]:
        """What an operator should look at now: a part down, a message waiting longer than
        WAITING_TOO_LONG, events given up on (the strip shows those in red)."""
        r = self.readings
        found = {name for name, up in (("database", r.database_up), ("queue", r.queue_up)) if not up}
        if r.oldest_pending_age > WAITING_TOO_LONG:
            found.add("oldest")
        if r.events_failed() > 0:
            found.add("events")
        return found


def age_text(seconds: float) -> str:
    """A duration the way a person reads it at a glance."""
    if seconds < 1:
        return "none"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def read() -> Health:
    """A reading on a session of its own: `read_readings` ends its transaction, which must not
    expire the rows the page is rendering."""
    with Session(db.engine) as session:
        return Health(read_readings(session))
