"""What happens in processes, counted where it happens: sends, their latency, rate-limit waits,
retries, lookups of unknown fates, fallbacks.

The sender runs in the worker, which Prometheus cannot scrape on every host (a Heroku worker
dyno has no port). So these counts are not served by the process that makes them: each process
adds to an in-memory tally (a dict under a lock: no I/O on the hot path), and a daemon thread
flushes the tally's deltas every METRICS_FLUSH_SECONDS in one write to the shared store
(`bot.metrics.shared_store`: one pipelined call to Redis, or one transaction in the SQLite
queue file on the embedded default). The web's `/metrics` reads the store's totals at scrape
time, so one scrape of any web process shows every worker's counts (docs/metrics.md).

Labels are bounded: a channel, an outcome, a provider's error code, a lane; never a number,
an address or an id.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

from bot.channels.base import Wait
from bot.channels.email.webhook_events import OPT_OUT_EVENTS, STATUS_BY_EVENT
from bot.channels.outcomes import Accepted, Failed, Unknown
from bot.vocabulary import OUTBOUND_STATUSES

log = logging.getLogger(__name__)

#: Every family's name starts with this (docs/metrics.md lists them all).
PREFIX = "bot_"
#: Seconds a send to a provider takes: from the request leaving to its answer.
SEND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds a send waits for its slot in the sender's rate budget (0 when a slot was free).
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
#: An `error_code` label with no code (Prometheus reads an empty label as an absent one).
NO_CODE = ""

Labels = tuple[tuple[str, str], ...]
T = TypeVar("T")


@dataclass(frozen=True)
class Family:
    """One metric family counted in processes: its name without `_total`, type, help, labels."""

    name: str
    kind: str  # "counter" or "histogram"
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


SENDS = Family(PREFIX + "sends", "counter",
               "Send attempts by channel and outcome (accepted, failed, retry, unknown, refused, held), "
               "with the provider's or our error code", ("channel", "outcome", "error_code"))
SEND_DURATION = Family(PREFIX + "send_duration_seconds", "histogram",
                       "Seconds from a send's request leaving to the provider's answer", ("channel",), SEND_BUCKETS)
RATE_LIMIT_WAIT = Family(PREFIX + "rate_limit_wait_seconds", "histogram",
                         "Seconds a send waited for a slot in its sender's rate budget", ("channel",), WAIT_BUCKETS)
RETRIES = Family(PREFIX + "send_retries", "counter",
                 "Failed attempts left retrying (a transient failure, or a fate to look up first)", ("channel",))
LOOKUPS = Family(PREFIX + "unknown_fate_lookups", "counter",
                 "Lookups of a send whose fate was unknown, by result (found, not_found, wait, failed)",
                 ("channel", "result"))
FALLBACKS = Family(PREFIX + "fallbacks", "counter",
                   "Notifications failed for good on a channel: the channel of their one fallback, or none",
                   ("channel", "to_channel"))

CALLBACKS = Family(PREFIX + "provider_callbacks", "counter",
                   "Status callbacks (Twilio) and events (SendGrid) received, by channel, status and error code",
                   ("channel", "status", "error_code"))

FAMILIES: dict[str, Family] = {family.name: family for family in
                               (SENDS, SEND_DURATION, RATE_LIMIT_WAIT, RETRIES, LOOKUPS, FALLBACKS, CALLBACKS)}
#: The statuses a callback label may carry (the outbound statuses, SendGrid's event names);
#: anything else a provider adds is "other", so a label never takes an unbounded value.
CALLBACK_STATUSES = (frozenset(OUTBOUND_STATUSES) | frozenset(STATUS_BY_EVENT) | OPT_OUT_EVENTS
                     | frozenset({"deferred", "click", "group_resubscribe"}))


class Store(Protocol):
    """Where every process's deltas add up (bot/metrics/shared_store.py)."""

    def add(self, deltas: dict[str, float]) -> None: ...

    def totals(self) -> dict[str, float]: ...


def sample_key(name: str, labels: Labels) -> str:
    """A sample's key in the store: its name and labels, as in the text format (`a{b="c"}`)."""
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in labels) + "}"


class Tally:
    """This process's deltas since its last flush, by sample key. A dict under a lock: the hot
    paths pay a few dictionary updates, no I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deltas: dict[str, float] = {}

    def add(self, key: str, amount: float = 1.0) -> None:
        with self._lock:
            self._deltas[key] = self._deltas.get(key, 0.0) + amount

    def add_many(self, items: dict[str, float]) -> None:
        with self._lock:
            for key, amount in items.items():
                self._deltas[key] = self._deltas.get(key, 0.0) + amount

    def take(self) -> dict[str, float]:
        """The deltas so far, and a fresh start."""
        with self._lock:
            deltas, self._deltas = self._deltas, {}
        return deltas

    def peek(self) -> dict[str, float]:
        with self._lock:
            return dict(self._deltas)


_tally = Tally()
_store: Store | None = None
_interval = 5.0
_enabled = False
_flush_lock = threading.Lock()
_flusher: tuple[int, threading.Thread] | None = None  # (pid, thread): a forked child starts its own
_keys: dict[tuple[str, Labels], tuple[str, ...]] = {}  # cache: (family, labels) -> its sample keys


def configure(store: Store | None, interval: float, enabled: bool = True) -> None:
    """Where this process's counts go, and how often; `enabled=False`: count nothing (bot/metrics/setup.py)."""
    global _store, _interval, _enabled
    _store, _interval, _enabled = store, interval, enabled


def store() -> Store | None:
    """The shared store this process flushes to (None: metrics off, or no app yet)."""
    return _store


def _count(family: Family, labels: Labels, amount: float = 1.0) -> None:
    if not _enabled:
        return
    key = _keys.get((family.name, labels))
    if key is None:
        key = _keys[(family.name, labels)] = (sample_key(family.name + "_total", labels),)
    _tally.add(key[0], amount)
    _ensure_flusher()


def _observe(family: Family, labels: Labels, value: float) -> None:
    if not _enabled:
        return
    keys = _keys.get((family.name, labels))
    if keys is None:
        keys = _keys[(family.name, labels)] = (
            *(sample_key(family.name + "_bucket", (*labels, ("le", _le(bound)))) for bound in family.buckets),
            sample_key(family.name + "_bucket", (*labels, ("le", "+Inf"))),
            sample_key(family.name + "_count", labels), sample_key(family.name + "_sum", labels))
    *buckets, inf, count, total = keys
    items = {key: 1.0 for bound, key in zip(family.buckets, buckets) if value <= bound}
    items.update({inf: 1.0, count: 1.0, total: value})
    _tally.add_many(items)  # cumulative buckets, as the text format has them: deltas add up
    _ensure_flusher()


def _le(bound: float) -> str:
    return repr(float(bound))


# ----------------------------------------------------------------------------- the call sites
# One line each in the code they count (docs/metrics.md names each site).


def send_outcome(channel: str, outcome: str, error_code: int | str | None = None) -> None:
    """One send attempt's outcome on `channel` (accepted, failed, retry, unknown, refused, held)."""
    _count(SENDS, (("channel", channel), ("outcome", outcome),
                   ("error_code", NO_CODE if error_code is None else str(error_code))))


#: The sender's own errors before or instead of a send, by class name (the sender imports this
#: module, so this module cannot import its classes): what the outcome label says of each.
ERROR_OUTCOMES = {"ShuttingDown": "released", "RateLimitFull": "rate_limited", "NotSent": "not_sent"}


def send_settled(channel: str, result: Any, error: BaseException | None) -> None:
    """One attempt's answer as the sender received it: the channel's Accepted, Failed or Unknown,
    or the error that stopped it (bot/delivery/sender.py, `_settle`)."""
    code = None
    if error is not None:
        outcome = ERROR_OUTCOMES.get(type(error).__name__, "unknown")
    elif isinstance(result, Accepted):
        outcome = "accepted"
    elif isinstance(result, Failed):
        outcome, code = ("held" if result.hold else "retry" if result.retry else "failed"), result.code
    elif isinstance(result, Unknown):
        outcome, code = "unknown", result.code
    else:
        outcome = "unknown"
    send_outcome(channel, outcome, code)


def lookup_answered(channel: str, error: BaseException | None, answer: Any = None) -> None:
    """A lookup of an unknown fate answered: found (an Accepted), wait, not_found, or failed."""
    result = ("failed" if error is not None else "found" if isinstance(answer, Accepted)
              else "wait" if isinstance(answer, Wait) else "not_found")
    lookup(channel, result)


def timed_send(channel: str, send: Callable[..., T], *args: Any) -> T:
    """`send(*args)`, its duration observed as the provider's latency on `channel` (raised or not)."""
    started = time.perf_counter()
    try:
        return send(*args)
    finally:
        _observe(SEND_DURATION, (("channel", channel),), time.perf_counter() - started)


def timed_rate_wait(channel: str, acquire: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
    """`acquire(*args, **kwargs)` (a rate-limit slot), the time it waited observed on `channel`."""
    started = time.perf_counter()
    try:
        return acquire(*args, **kwargs)
    finally:
        _observe(RATE_LIMIT_WAIT, (("channel", channel),), time.perf_counter() - started)


def retry(channel: str) -> None:
    """A failed attempt left `retrying` on `channel`."""
    _count(RETRIES, (("channel", channel),))


def lookup(channel: str, result: str) -> None:
    """A lookup of an unknown fate on `channel`: found, not_found, wait or failed."""
    _count(LOOKUPS, (("channel", channel), ("result", result)))


def provider_callback(channel: str, status: str, error_code: str | int | None = None) -> None:
    """A status callback or an event from `channel`'s provider (its error code, digits only)."""
    code = "" if error_code in (None, "") else str(error_code)
    _count(CALLBACKS, (("channel", channel), ("status", status if status in CALLBACK_STATUSES else "other"),
                       ("error_code", code if code.isdigit() and len(code) <= 6 else "" if not code else "other")))


def fallback(channel: str, to_channel: str | None) -> None:
    """A notification failed for good on `channel`; its fallback went to `to_channel` (None: no channel could)."""
    _count(FALLBACKS, (("channel", channel), ("to_channel", to_channel or "none")))


# ----------------------------------------------------------------------------- flushing


def flush() -> bool:
    """Add this process's deltas to the shared store now; on failure keep them for the next
    flush (nothing counted is lost while the store is away). False when they could not go."""
    if _store is None:
        return False
    with _flush_lock:
        deltas = _tally.take()
        if not deltas:
            return True
        try:
            _store.add(deltas)
            return True
        except Exception as exc:  # Redis or the queue file away: the counts wait in memory
            _tally.add_many(deltas)
            log.warning("metrics: could not flush counters to the shared store (%s); kept for the next flush",
                        type(exc).__name__)
            return False


def totals() -> dict[str, float]:
    """Every process's counts as the shared store holds them (after flushing this one's)."""
    if _store is None:
        return _tally.peek()  # no store configured: this process's own counts
    flush()
    return _store.totals()


def _ensure_flusher() -> None:
    global _flusher
    pid = os.getpid()
    if _flusher is not None and _flusher[0] == pid:
        return
    with _flush_lock:
        if _flusher is not None and _flusher[0] == pid:
            return
        thread = threading.Thread(target=_flush_forever, name="metrics-flush", daemon=True)
        _flusher = (pid, thread)
        thread.start()


def _flush_forever() -> None:
    while True:
        time.sleep(_interval)
        flush()


atexit.register(flush)  # a worker told to stop flushes what it counted since the last interval
