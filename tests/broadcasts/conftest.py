"""Broadcast tests run the queue in this process, one task at a time: a pump turn takes one step
and hands over (a real worker's turn steps for seconds while its sends run beside it)."""
from __future__ import annotations

import pytest

from bot.broadcasts import pump


@pytest.fixture(autouse=True)
def one_step_per_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pump, "TURN_SECONDS", 0.0)
