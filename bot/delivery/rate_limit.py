"""One send rate per sender, shared by every worker process (docs/ARCHITECTURE.md, invariant 10).

Twilio lets a WhatsApp sender send `TWILIO_MESSAGES_PER_SECOND` messages a second (80 by
default, 400 for text on request) and answers a burst beyond its REST concurrency with 429. The
`limits` library keeps a moving window per sender: in Redis (REDIS_URL) when the queue is there,
so every consumer on every dyno draws from the same budget; in process memory on the embedded
SQLite default, where one worker process is the deployment. A send waits for a slot rather than
meeting a 429; a 429 or 63018 from Twilio drains the rest of the current second for everyone.

Redis unreachable (a blip, a failover, the network) is a reason to wait, never to fail a message:
`acquire` keeps asking until Redis answers or its wait runs out (then the sender leaves the
message `retrying`; docs/ARCHITECTURE.md, "Retries"). A local budget would keep sends going, but
no process knows how many others share the sender, so no share of the rate it could pick is
provably safe (invariant 10); and Redis down stops the queue too, so only the sends already
claimed are waiting, and only for the outage.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from flask import Flask, current_app
from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

#: Worker threads build the limiter once between them: two in-memory budgets would each allow the rate.
_build_lock = threading.Lock()
#: The longest a send waits for a slot before it gives up and is retried later.
MAX_WAIT_SECONDS = 30.0
#: How often a send waiting for an unreachable Redis asks again.
UNAVAILABLE_RETRY_SECONDS = 0.5
#: A full window is asked again this long after its oldest send leaves it (clocks of the worker
#: and of the window's entries are the same machine's or NTP's: a millisecond absorbs rounding).
WINDOW_MARGIN_SECONDS = 0.001
#: How often a thread waiting in line (or sleeping for the window) checks whether its wait was
#: cancelled (the worker stopping): a local check, no Redis call.
CANCEL_CHECK_SECONDS = 0.25
#: Redis calls time out rather than hang: a send stuck in a call to a vanished host would hold its
#: claim (renewed while it waits) for ever.
REDIS_TIMEOUT_SECONDS = 5.0


class SendRateLimit:
    """A moving-window limit of `per_second` sends for each sender."""

    def __init__(self, per_second: int, storage_uri: str, namespace: str,
                 max_wait: float = MAX_WAIT_SECONDS) -> None:
        self.item = RateLimitItemPerSecond(per_second)
        #: The rate of each other channel's senders (`rate`): email has its own, apart from Twilio's.
        self._items: dict[int, RateLimitItemPerSecond] = {per_second: self.item}
        # Every storage error comes out as limits' StorageError, whatever the backend's own type.
        options: dict = {"wrap_exceptions": True}
        if storage_uri.startswith(("redis", "rediss")):
            options.update(socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri, **options))
        self.namespace = namespace
        self.max_wait = max_wait
        #: Per (rate, sender): the threads of this process waiting for a slot, first in line first.
        self._lines: dict[tuple[int, str, int], _Line] = {}

    def _item(self, rate: int | None) -> RateLimitItemPerSecond:
        if rate is None:
            return self.item
        item = self._items.get(rate)
        if item is None:
            item = self._items.setdefault(rate, RateLimitItemPerSecond(rate))
        return item

    def acquire(self, sender: str, max_wait: float | None = None,
                cancelled: Callable[[], bool] | None = None, rate: int | None = None,
                keep_free: int = 0) -> bool:
        """Take one slot for `sender`, waiting as long as the window needs; False after `max_wait`
        (default: the limiter's), or as soon as `cancelled()` says the wait is pointless (the
        worker is stopping). `rate`: this sender's sends per second, when not the limiter's own
        (a channel with a rate of its own). An unreachable Redis is waited for, never raised: no
        slot can be proven free while the shared budget cannot be read.

        Waiting costs no CPU: the threads of one process that want a slot of the same budget
        queue here, in order, and only the first of them asks the window. When the window is
        full it sleeps until the window's oldest send leaves it (the moment the next slot frees),
        never polling; then it takes the slot and the next thread in line takes its turn
        (docs/delivery.md, "Waiting for a rate slot").

        `keep_free`: take a slot only while more than this many are free in the window (a
        broadcast's send leaves the last ones to replies and /notify, which therefore never wait
        for a broadcast: invariant 16). Such sends wait in a line of their own, so nobody else
        ever queues behind them.
        """
        item = self._item(rate)
        deadline = time.monotonic() + (self.max_wait if max_wait is None else max_wait)
        line = self._line(item, sender, keep_free)
        turn = line.join(deadline, cancelled)
        if turn is None:
            return False
        try:
            return self._take(item, sender, deadline, cancelled, keep_free)
        finally:
            line.leave(turn)

    def _line(self, item: RateLimitItemPerSecond, sender: str, keep_free: int = 0) -> "_Line":
        key = (item.amount, sender, keep_free)
        line = self._lines.get(key)
        if line is None:
            with _build_lock:
                line = self._lines.setdefault(key, _Line())
        return line

    def _take(self, item: RateLimitItemPerSecond, sender: str, deadline: float,
              cancelled: Callable[[], bool] | None, keep_free: int = 0) -> bool:
        """The first in line takes its slot: one hit when the window has room; when it is full,
        one read of when it frees and one sleep until then. With `keep_free`, "room" is more
        than that many free slots (read first: a concurrent send may take one in between, so the
        reserve can be short by the sends racing, never by more)."""
        unavailable = False
        while True:
            if cancelled is not None and cancelled():
                return False
            try:
                roomy = not keep_free or self.limiter.test(item, self.namespace, sender, cost=keep_free + 1)
                if roomy and self.limiter.hit(item, self.namespace, sender):
                    if unavailable:
                        log.info("the send rate limit's Redis answers again; sends from %s go on", _masked(sender))
                    return True
                reset_at = self.limiter.get_window_stats(item, self.namespace, sender).reset_time
                # The oldest send in the window leaves it at `reset_at`: the next slot is free then.
                wait = max(reset_at - time.time(), 0.0) + WINDOW_MARGIN_SECONDS
            except StorageError as exc:
                if not unavailable:
                    log.warning("the send rate limit's Redis is unreachable (%s); sends from %s wait for it",
                                type(exc.storage_error).__name__, _masked(sender))
                unavailable, wait = True, UNAVAILABLE_RETRY_SECONDS
            if time.monotonic() + wait > deadline:
                if unavailable:
                    log.warning("the send rate limit's Redis stayed unreachable until the send's wait ran out; "
                                "the send is retried later")
                return False
            _sleep(wait, cancelled)

    def slow_down(self, sender: str, rate: int | None = None) -> None:
        """The provider said "too fast" (429, 63018): spend what is left of this second, for every
        worker.

        With Redis unreachable nothing is spent: no send can take a slot from it either.
        """
        item = self._item(rate)
        try:
            remaining = self.limiter.get_window_stats(item, self.namespace, sender).remaining
            if remaining > 0:
                self.limiter.hit(item, self.namespace, sender, cost=remaining)
        except StorageError as exc:
            log.warning("Twilio asked us to slow down, and the send rate limit's Redis is unreachable (%s)",
                        type(exc.storage_error).__name__)
            return
        log.warning("Twilio asked us to slow down: sends from %s pause for the rest of this second", _masked(sender))


class _Line:
    """The threads of one process waiting for one budget's slot, in arrival order.

    Only the first in line talks to the window (Redis); the others sleep on their own event until
    it is their turn, so a thousand sends waiting at 80 a second cost what eighty cost, not a
    thousand polls. Fair: a send never waits behind sends that asked after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()

    def join(self, deadline: float, cancelled: Callable[[], bool] | None) -> threading.Event | None:
        """Wait for this thread's turn; None when the deadline passed or the wait was cancelled."""
        turn = threading.Event()
        with self._lock:
            self._waiting.append(turn)
            if self._waiting[0] is turn:
                turn.set()
        while not turn.wait(min(max(deadline - time.monotonic(), 0.0), CANCEL_CHECK_SECONDS)):
            if time.monotonic() >= deadline or (cancelled is not None and cancelled()):
                self.leave(turn)
                return None
        return turn

    def leave(self, turn: threading.Event) -> None:
        """Out of the line (done, or given up); the next in line, if this was the first, goes on."""
        with self._lock:
            first = bool(self._waiting) and self._waiting[0] is turn
            self._waiting.remove(turn)
            if first and self._waiting:
                self._waiting[0].set()


def _sleep(seconds: float, cancelled: Callable[[], bool] | None) -> None:
    """Sleep `seconds`, waking early only when `cancelled()` turns true (checked locally)."""
    if cancelled is None:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and not cancelled():
        time.sleep(min(left, CANCEL_CHECK_SECONDS))


def bulk_share_key(rate_key: str) -> str:
    """The budget a broadcast's sends draw on first, beside their sender's own (`rate_key`): a
    broadcast send takes a slot here (at most its share of the rate), then one in the sender's
    window leaving `bulk_reserve` slots free, so broadcasts never use more than their share and
    conversations and /notify always find the rest free (docs/ARCHITECTURE.md, invariant 16)."""
    return rate_key + ":bulk"


def bulk_share_rate(rate: int, share: float) -> int:
    """A broadcast's sends per second from a sender of `rate`: BROADCAST_RATE_SHARE of it, at least one."""
    return max(1, int(rate * share))


def _masked(sender: str) -> str:
    """A sender address for the log: its last four digits (no phone numbers in logs)."""
    return "…" + sender[-4:]


def init_app(app: Flask) -> None:
    """The limiter is built on first use (only workers send; web processes never need it)."""
    app.extensions["send_rate_limit"] = None


def send_rate_limit() -> SendRateLimit:
    """The current app's limiter, from TWILIO_MESSAGES_PER_SECOND and the queue's Redis (if any)."""
    limit = current_app.extensions.get("send_rate_limit")
    if limit is None:
        with _build_lock:
            limit = current_app.extensions.get("send_rate_limit")
            if limit is None:
                cfg = current_app.config
                limit = SendRateLimit(
                    per_second=int(cfg["TWILIO_MESSAGES_PER_SECOND"]),
                    storage_uri=cfg.get("REDIS_URL") or "memory://",
                    # Two bots can share one Redis (different QUEUE_NAME); their budgets must not mix.
                    namespace=f"{cfg.get('QUEUE_NAME') or 'whatsapp-bot'}:send-rate",
                )
                current_app.extensions["send_rate_limit"] = limit
    return limit
