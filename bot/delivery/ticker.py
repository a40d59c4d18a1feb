"""Tasks every few seconds: huey's periodic tasks run at most once a minute, and a held message
must leave within seconds of its time (invariant 15).

The consumer's scheduler thread already wakes every second (`huey_consumer -s`, default 1) to
move due scheduled tasks onto the queue; `TickingScheduler` also enqueues each task registered
with `every` when its interval has passed and its previous run has started, so a backlog never
piles ticks up. Each consumer ticks on its own; the work they do (one indexed statement) is safe
to run at once on several.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from huey.consumer import Scheduler

log = logging.getLogger(__name__)

#: A tick whose task never reported starting (lost in a Redis flush, or run by another process)
#: is enqueued again after this long.
TICK_LOST_AFTER = 60.0


@dataclass
class Tick:
    """One task enqueued every `seconds` (its priority on the queue: `priority`)."""

    task: Any
    seconds: float
    priority: int
    enqueued_at: float = float("-inf")
    started_at: float = float("-inf")

    def due(self, now: float) -> bool:
        if now - self.enqueued_at < self.seconds:
            return False
        return self.started_at >= self.enqueued_at or now - self.enqueued_at >= TICK_LOST_AFTER


TICKS: dict[str, Tick] = {}


def every(seconds: float, task: Any, priority: int = 0) -> None:
    """Enqueue huey task `task` (no arguments) every `seconds` on each consumer."""
    TICKS[task.name] = Tick(task, seconds, priority)


def started(name: str) -> None:
    """Called by a ticking task as it starts: the next tick may be enqueued."""
    tick = TICKS.get(name)
    if tick is not None:
        tick.started_at = time.monotonic()


class TickingScheduler(Scheduler):
    """huey's scheduler, which also enqueues the tasks registered with `every`."""

    def loop(self, now: Any = None) -> None:
        moment = time.monotonic()
        for tick in TICKS.values():
            if tick.due(moment):
                try:
                    tick.task(priority=tick.priority)
                    tick.enqueued_at = moment
                except Exception:  # the queue is down: tried again next second
                    log.warning("could not enqueue %s", tick.task.name)
        super().loop(now)
