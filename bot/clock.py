"""Time in one convention: naive UTC datetimes, the same on SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    """The current time as a naive UTC datetime (what every timestamp column stores)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def isoformat(value: datetime | None) -> str | None:
    """A stored naive-UTC timestamp as ISO 8601 with an explicit 'Z'."""
    return None if value is None else value.isoformat(timespec="seconds") + "Z"
