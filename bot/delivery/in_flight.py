"""Twilio calls in flight at once: one thread pool per worker process, shared by its huey threads.

A send task claims a batch of messages and hands their API calls to this pool, so a worker keeps
SEND_CONCURRENCY calls waiting on Twilio at once while its huey threads (WORKER_THREADS) stay free
for turns. The pool's threads only wait on HTTP: they never touch the database, which the task's
own thread reads before and records after (docs/ARCHITECTURE.md, "How many sends at once").
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Sequence

from bot.clock import utcnow

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


@dataclass
class Call:
    """One call's outcome: what it returned or raised, and when it started (for timeout lookups)."""

    started: datetime
    result: Any = None
    error: BaseException | None = None


def pool(size: int) -> ThreadPoolExecutor:
    """This process's pool of `size` threads (created on first use; a bigger size replaces it)."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            old, _pool, _pool_size = _pool, ThreadPoolExecutor(max_workers=size, thread_name_prefix="twilio"), size
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def call_all(function: Callable[..., Any], calls: Sequence[dict[str, Any]], size: int, *,
             every: float | None = None, while_waiting: Callable[[], None] | None = None) -> list[Call]:
    """`function(**kwargs)` for every kwargs in `calls`, all at once on the pool; in order.

    Exceptions are caught and returned, one per call, so one failure never hides the others'
    results (each of which is a message Twilio may have accepted). While calls are still running,
    `while_waiting()` runs in the caller's thread every `every` seconds: the sender renews its
    claims' lease there, so a slow batch is never taken over and a dead one is soon (invariant 2).
    Even a single call goes to the pool, which keeps the caller's thread free for that.
    """
    futures = [pool(size).submit(_run, function, kwargs) for kwargs in calls]
    while True:
        _, running = wait(futures, timeout=every)
        if not running:
            break
        if while_waiting is not None:
            while_waiting()
    return [future.result() for future in futures]


def _run(function: Callable[..., Any], kwargs: dict[str, Any]) -> Call:
    call = Call(started=utcnow())
    try:
        call.result = function(**kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller, never lost
        call.error = exc
    return call
