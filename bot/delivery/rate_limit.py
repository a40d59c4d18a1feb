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
from typing import Any, Callable, TypeVar

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
#: How often the first in line, sleeping for the window (or for an unreachable Redis), checks
#: whether its wait was cancelled (the worker stopping): a local check, no Redis call. The threads
#: behind it do not check: they sleep until woken (`_Line.join`).
CANCEL_CHECK_SECONDS = 0.25
#: The most slots the first in line takes in one call to the window, for itself and the sends
#: waiting behind it (a send batch is at most 50 messages: docs/delivery.md, "Waiting for a rate
#: slot").
MAX_SLOTS_PER_CALL = 50
#: A send that keeps slots free (a broadcast's) takes at most this fraction of the reserve at once:
#: the reserve is read, then taken from, in two calls, so each process racing another can eat into
#: it by one take (a quarter of the reserve), never more.
KEEP_FREE_TAKE_FRACTION = 0.25
#: Redis calls time out rather than hang: a send stuck in a call to a vanished host would hold its
#: claim (renewed while it waits) for ever.
REDIS_TIMEOUT_SECONDS = 5.0

_T = TypeVar("_T")


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
        #: Per budget key: the pacer of the sends that ask to be spread (`pace`).
        self._pacers: dict[str, Pacer] = {}

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
        turn = line.join(deadline)
        if turn is None:
            return False
        if turn.granted:  # the first in line took this send's slot along with its own
            return True
        try:
            # Slots for the sends waiting behind this one too, in the same call to the window;
            # each is handed to a send already waiting, which goes at once (never kept for later).
            most = min(MAX_SLOTS_PER_CALL, item.amount - keep_free,
                       max(1, int(keep_free * KEEP_FREE_TAKE_FRACTION)) if keep_free else MAX_SLOTS_PER_CALL)
            taken = self._take(item, sender, deadline, cancelled, keep_free,
                               wanted=lambda: max(1, min(most, line.waiting())))
            if taken > 1:
                line.grant(turn, taken - 1)
            return taken > 0
        finally:
            line.leave(turn)

    def _line(self, item: RateLimitItemPerSecond, sender: str, keep_free: int = 0) -> "_Line":
        return _made(self._lines, (item.amount, sender, keep_free), _Line)

    def pace(self, key: str, rate: int, cancelled: Callable[[], bool] | None = None) -> bool:
        """Wait until this process's next send of budget `key` may go, one every 1/`rate` s
        (`Pacer`: a broadcast's sends, before their slots); False if `cancelled()` turned true."""
        return _made(self._pacers, key, Pacer).wait(rate, cancelled)

    def _take(self, item: RateLimitItemPerSecond, sender: str, deadline: float,
              cancelled: Callable[[], bool] | None, keep_free: int = 0,
              wanted: Callable[[], int] = lambda: 1) -> int:
        """The first in line takes slots for itself and the sends behind it (`wanted()` of them,
        asked again on each try): as many as the window has free, up to that, in one hit (the
        window counts each slot as a send: the rate holds in every window); when it is full, one
        sleep until its oldest send leaves it. How many it took: 0 when the deadline passed or the
        wait was cancelled.

        With `keep_free`, "room" is more than that many free slots: the window is read first,
        then taken from (a concurrent process may take some in between, so the reserve can be
        short by what the racing processes take, never more)."""
        unavailable = False
        want = wanted()
        while True:
            if cancelled is not None and cancelled():
                return 0
            try:
                # One send alone: one call when there is room. Several, or a reserve to keep:
                # read how many are free first, then take that many (two calls for the lot).
                if not keep_free and want == 1:
                    taken = 1 if self.limiter.hit(item, self.namespace, sender) else 0
                    if not taken:  # refused: until when?
                        stats = self.limiter.get_window_stats(item, self.namespace, sender)
                        free = stats.remaining
                else:
                    stats = self.limiter.get_window_stats(item, self.namespace, sender)
                    free = stats.remaining - keep_free
                    want = min(want, free)
                    taken = want if want > 0 and self.limiter.hit(item, self.namespace, sender, cost=want) else 0
                if taken:
                    if unavailable:
                        log.info("the send rate limit's Redis answers again; sends from %s go on", _masked(sender))
                    return taken
                # The oldest send in the window leaves it at `reset_time`: a slot is free then. (A
                # refusal despite room: another process took it first; a millisecond, not a spin.)
                wait = WINDOW_MARGIN_SECONDS if free > 0 else \
                    max(stats.reset_time - time.time(), 0.0) + WINDOW_MARGIN_SECONDS
            except StorageError as exc:
                if not unavailable:
                    log.warning("the send rate limit's Redis is unreachable (%s); sends from %s wait for it",
                                type(exc.storage_error).__name__, _masked(sender))
                unavailable, wait = True, UNAVAILABLE_RETRY_SECONDS
            if time.monotonic() + wait > deadline:
                if unavailable:
                    log.warning("the send rate limit's Redis stayed unreachable until the send's wait ran out; "
                                "the send is retried later")
                return 0
            _sleep(wait, cancelled)
            want = wanted()

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


class _Turn:
    """One waiting send's place in a line: woken when it is first, or when the first took its slot."""

    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.granted = False


class _Line:
    """The threads of one process waiting for one budget's slot, in arrival order.

    Only the first in line talks to the window (Redis), and it takes slots for the threads
    waiting behind it too, in one call (`grant`); the others sleep on their own event until it is
    their turn or their slot was taken for them, so a thousand sends waiting at 80 a second cost
    what a few calls a second cost, not a thousand polls. Fair: a send never waits behind sends
    that asked after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Turn] = collections.deque()

    def join(self, deadline: float) -> _Turn | None:
        """Wait for this thread's turn (or its slot); None when the deadline passed (a slot taken
        for it meanwhile goes unused: the window only ever counts more).

        The thread sleeps until it is woken or its deadline comes, and nothing else: at 80/s a
        batch's sends wait here in dozens for seconds, and each waking four times a second to ask
        whether the worker stops cost 0.1 ms of CPU per send (bench/THROUGHPUT.md, "Issue 17: a
        send's waits"). A stop reaches it through the line instead: the first in line asks
        `cancelled` while it waits for the window, and gives up; leaving, it wakes the next, who
        is first now and asks at once (`SendRateLimit._take`), and so on down the line."""
        turn = _Turn()
        with self._lock:
            self._waiting.append(turn)
            if self._waiting[0] is turn:
                turn.event.set()
        while not turn.event.wait(max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                self.leave(turn)
                return None
        return turn

    def waiting(self) -> int:
        """How many threads stand in line, the first included."""
        return len(self._waiting)

    def grant(self, first: _Turn, slots: int) -> None:
        """The first in line took `slots` more than its own: the next `slots` threads in line have
        theirs, and go at once. Fewer waiting now (some gave up): the rest are left unused."""
        with self._lock:
            while slots > 0 and len(self._waiting) > 1 and self._waiting[0] is first:
                granted = self._waiting[1]
                del self._waiting[1]
                granted.granted = True
                granted.event.set()
                slots -= 1

    def leave(self, turn: _Turn) -> None:
        """Out of the line (done, or given up); the next in line, if this was the first, goes on."""
        with self._lock:
            if turn not in self._waiting:  # its slot was granted as it gave up
                return
            first = self._waiting[0] is turn
            self._waiting.remove(turn)
            if first and self._waiting:
                self._waiting[0].event.set()


def _sleep(seconds: float, cancelled: Callable[[], bool] | None) -> None:
    """Sleep `seconds`, waking early only when `cancelled()` turns true (checked locally)."""
    if cancelled is None:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and not cancelled():
        time.sleep(min(left, CANCEL_CHECK_SECONDS))


class Pacer:
    """Spaces this process's calls evenly: at most one every 1/rate s, in arrival order.

    A moving window lets its whole budget go in one burst, and then keeps that shape: each slot
    frees a second after it was taken, so a broadcast that took its slots in a burst takes them
    again in a burst a second later, and between bursts the sender's window is full. A reply
    arriving then waited for the next burst's expiries, up to most of a second
    (bench/THROUGHPUT.md, "Broadcasts", seventh run). A broadcast's sends paced one every
    1/share s leave the window's slots expiring one at a time, so a reply that finds the window
    full waits for the next one to free (1/rate s at most), never for a burst. The windows in
    Redis still hold the rates across processes; this only spreads each process's sends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self, rate: int, cancelled: Callable[[], bool] | None = None) -> bool:
        """Wait for this call's turn (one every 1/`rate` s); False if `cancelled()` turned true."""
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next)
            self._next = at + 1.0 / max(rate, 1)
        if at > now:
            _sleep(at - now, cancelled)
        return not (cancelled is not None and cancelled())


def _made(made: dict[Any, _T], key: Any, make: Callable[[], _T]) -> _T:
    """`made[key]`, made once: the worker's threads race to the first use of a line or a pacer,
    and two of them would each let their sends through."""
    found = made.get(key)
    if found is None:
        with _build_lock:
            found = made.setdefault(key, make())
    return found


def bulk_share_key(rate_key: str) -> str:
    """The budget a broadcast's sends draw on first, beside their sender's own (`rate_key`): a
    broadcast send takes a slot here (at most its share of the rate), then one in the sender's
    window leaving `bulk_reserve` slots free, so broadcasts never use more than their share and
    conversations and /notify always find the rest free (docs/ARCHITECTURE.md, invariant 16)."""
    return rate_key + ":bulk"


def bulk_share_rate(rate: int, share: float) -> int:
    """A broadcast's sends per second from a sender of `rate`: BROADCAST_RATE_SHARE of it, at least one."""
    return max(1, int(rate * share))


def bulk_headroom(rate: int, bulk_rate: int) -> int:
    """The slots a broadcast's send leaves free in its sender's window (`acquire(keep_free=…)`):
    one for every sixteen of the reserve (the rate less the broadcast's share), at least one — 1
    at the default 80/s and 80% share.

    The share's own window (`bulk_share_key`) already keeps the reserve for replies and
    /notify: a broadcast never takes more than its share, so while they use less than the rest,
    the rest stays free. Keeping the whole reserve free on top of what they use counted it twice:
    with replies at 20/s from an 80/s sender, a broadcast drained at 44/s, not the 58-60 they left
    it (bench/THROUGHPUT.md, "Broadcasts", sixth run). Only when replies use more than the reserve
    does this matter: the broadcast then takes what they leave but this headroom, so a reply
    arriving finds a slot at once, and replies arriving together wait at most for the window's
    next turnover (1/rate s each). No reserve (a share of the whole rate, or a sender of 1/s): none."""
    reserve = rate - bulk_rate
    return max(1, reserve // 16) if reserve > 0 else 0


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
