"""The worker's graceful stop: told to stop (SIGTERM on every deploy, restart and daily cycle),
it finishes the sends already in flight, records them, and starts no new one.

huey's consumer learns of the signal in its main thread; `DrainingConsumer.stop` raises the
process-wide `stopping` flag before huey waits for its workers (`--graceful-signal TERM
--shutdown-timeout` in the Procfile). The sender reads the flag: a call that has not left yet is
released back to the queue (`sender.Outcome.RELEASED`), one already on the wire is waited for and
its answer committed (docs/ARCHITECTURE.md, "Bad days").
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from huey import Huey
from huey.consumer import Consumer

from bot.delivery.ticker import TickingScheduler

log = logging.getLogger(__name__)

#: How long a stop waits for sends in flight outside huey's threads: within the Procfile's
#: --shutdown-timeout 25, which also bounds huey's own (tests/test_packaging.py).
DRAIN_SECONDS = 24.0

#: Set once this process has been told to stop; never cleared (the process exits).
stopping = threading.Event()
#: Waits for sends in flight outside huey's own threads (the sender's hand-over threads),
#: registered by the tasks module; each is given the time huey is given.
_drains: list[Callable[[float], None]] = []


def register_drain(drain: Callable[[float], None]) -> None:
    """Wait for `drain(timeout)` too when the worker stops."""
    _drains.append(drain)


def is_stopping() -> bool:
    """Whether this worker process is draining: no new Twilio call may start."""
    return stopping.is_set()


class DrainingConsumer(Consumer):
    """huey's consumer, raising `stopping` as soon as a stop begins (graceful or not); its
    scheduler also enqueues the tasks that run every few seconds (bot/delivery/ticker.py)."""

    scheduler_class = TickingScheduler
    #: huey's consumer takes a second graceful signal as "stop now" (its workers interrupted).
    #: The bulk process turns that off: the worker forwards its SIGTERM and a host may signal
    #: every process too, and the second must not cut the first's drain short
    #: (bot/delivery/bulk_process.py).
    repeated_stop_interrupts = True

    def _handle_signal(self, signum: int, frame: Any) -> None:
        if not self.repeated_stop_interrupts and self._signum is not None:
            return  # already stopping
        super()._handle_signal(signum, frame)
        if not self.repeated_stop_interrupts:
            signal.signal(signum, self._handle_signal)  # huey put the "stop now" handler there

    def stop(self, graceful: bool = False) -> None:
        if not stopping.is_set():
            log.info("worker stopping: sends in flight finish, the rest go back to the queue")
        stopping.set()
        # The hand-over threads finish their sends while huey's threads finish theirs.
        drains = [threading.Thread(target=drain, args=(DRAIN_SECONDS,), daemon=True) for drain in _drains]
        for thread in drains:
            thread.start()
        super().stop(graceful=graceful)
        for thread in drains:
            thread.join(DRAIN_SECONDS)


class DrainingHuey(Huey):
    """Huey whose consumer (`huey_consumer wsgi.huey`) drains sends on stop."""

    def create_consumer(self, **options: Any) -> Consumer:
        return DrainingConsumer(self, **options)
