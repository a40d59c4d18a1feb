"""The bulk lane: threads of the worker process of their own for a broadcast's work, so it never
holds the huey threads that turns need (docs/ARCHITECTURE.md, invariant 16 and "Broadcasts").

A broadcast's send batch spends most of its life waiting: for the bulk share's rate slots, then
for Twilio; the pump sleeps between its steps. On huey's threads (WORKER_THREADS) that waiting
kept a turn from a free thread for up to a Twilio round trip: a reply's p99 beside a broadcast
was about three times its p99 alone (bench/THROUGHPUT.md, "Broadcasts", fifth run). The huey
task now only hands the work over and ends: a send batch to one of at most BULK_LANE_THREADS
threads, in arrival order (`take`); a pump turn to a thread of its own at once (`start`: one per
live broadcast at a time, so its window is topped up on time even while every lane thread waits
for slots). Each runs in an application context of its own.

Nothing is lost: what waits here is a queue task taken off the queue, no more. A send's message
is still `pending` in the database (not claimed yet; the pump's straggler kick and the outbox
sweep enqueue it again), a pump turn's chain is restarted by the broadcasts' sweep. A worker told
to stop gives back what has not started (`drain`: back on the queue, for the next worker), and
waits for what is running: a batch's calls on the wire are answered and recorded, a pump turn
ends at its next step (bot/delivery/shutdown.py).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from bot.delivery.shutdown import is_stopping

log = logging.getLogger(__name__)

#: Work waiting for a lane thread beyond which the huey thread runs it itself (as before the
#: lane): a broadcast keeps only a small window unsent, so this is a backlog's bound, not a pace.
WAITING_MAX = 500


@dataclass(frozen=True)
class Work:
    """One piece of bulk work: `run()` does it, `give_back()` puts it back on the queue untouched
    (the worker is stopping). Both run in `app`'s context; `name` is for the log."""

    app: Any
    name: str
    run: Callable[[], Any]
    give_back: Callable[[], Any]


class BulkLane:
    """At most `threads()` threads running bulk work handed over by huey's threads, in order."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._waiting: collections.deque[Work] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._running = 0  # lane threads running work
        self._started = 0  # threads of their own running work (`start`)

    def take(self, work: Work, threads: int) -> bool:
        """Queue `work` for a lane thread (at most `threads` of them); False when the lane is off
        (`threads` 0), the worker is stopping or WAITING_MAX wait already: the caller runs it."""
        if threads <= 0 or is_stopping():
            return False
        with self._ready:
            if len(self._waiting) >= WAITING_MAX:
                return False
            self._waiting.append(work)
            if len(self._threads) < threads and len(self._threads) <= self._running + len(self._waiting) - 1:
                thread = threading.Thread(target=self._run, name=f"bulk-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._ready.notify()
        return True

    def start(self, work: Work) -> bool:
        """Run `work` now on a thread of its own, beside the lane's (a pump turn: its chain runs
        one turn at a time, so a broadcast holds at most one such thread); False when the worker
        is stopping: the caller runs it."""
        if is_stopping():
            return False
        with self._ready:
            self._started += 1
        threading.Thread(target=self._do, args=(work, True), name="bulk-turn", daemon=True).start()
        return True

    def running(self) -> int:
        """How many pieces of work lane threads are running now (for tests and the log)."""
        with self._ready:
            return self._running

    def started(self) -> int:
        """How many pieces of work threads of their own are running now (`start`)."""
        with self._ready:
            return self._started

    def waiting(self) -> int:
        """How many pieces of work wait for a lane thread."""
        with self._ready:
            return len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    if is_stopping():
                        return
                    self._ready.wait(0.5)
                work = self._waiting.popleft()
                self._running += 1
            self._do(work)

    def _do(self, work: Work, own_thread: bool = False) -> None:
        """Run one piece of work (counted by the caller); give it back instead if the worker
        began stopping meanwhile."""
        try:
            with work.app.app_context():
                (work.give_back if is_stopping() else work.run)()
        except Exception:
            # Each piece of work handles its own failures (they go back on the queue); this
            # is a bug, and the sweeps are the net (the module's docstring).
            log.exception("bulk work %s failed", work.name)
        finally:
            with self._ready:
                if own_thread:
                    self._started -= 1
                else:
                    self._running -= 1
                self._ready.notify_all()

    def drain(self, timeout: float) -> None:
        """The worker is stopping: give back the work not started, then wait (up to `timeout`)
        for the work running to end (registered with shutdown.register_drain)."""
        deadline = time.monotonic() + timeout
        with self._ready:
            left, self._waiting = list(self._waiting), collections.deque()
            self._ready.notify_all()
        for work in left:
            try:
                with work.app.app_context():
                    work.give_back()
            except Exception:
                log.exception("could not give bulk work %s back to the queue; the sweeps will", work.name)
        with self._ready:
            while (self._running or self._started) and time.monotonic() < deadline:
                self._ready.wait(min(0.5, max(deadline - time.monotonic(), 0)))


#: This worker process's lane.
lane = BulkLane()
