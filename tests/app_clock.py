"""The app's clock, set by a test: `bot.clock.utcnow`, and as every loaded `bot` module imported it.

A test moves time instead of sleeping for it (a message made at 20:59 and sent at 21:05, a night
across a daylight-saving change). The simulators (`bot.devtools`) keep the real clock: they play
the providers, whose clocks are not ours. Column defaults (`default=utcnow` in bot/models.py)
were bound when the models were defined and keep the real clock too.
"""
from __future__ import annotations

import sys
from datetime import datetime
from typing import Iterator

import pytest

from bot import clock

_REAL = clock.utcnow


class AppClock:
    """Reads `now` once set; until then, the real time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now if self.now is not None else _REAL()

    def set(self, instant: datetime) -> None:
        """From now on every `utcnow()` of the app answers `instant` (naive UTC)."""
        self.now = instant
        for name, module in list(sys.modules.items()):
            if (name.startswith("bot.") and not name.startswith("bot.devtools")
                    and getattr(module, "utcnow", None) is _REAL):
                self._monkeypatch.setattr(module, "utcnow", self)


@pytest.fixture
def app_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[AppClock]:
    """The app's clock, real until a test sets it; restored after the test."""
    yield AppClock(monkeypatch)
