"""One send rate per sender, shared by every worker process (docs/ARCHITECTURE.md, invariant 10).

Twilio lets a WhatsApp sender send `TWILIO_MESSAGES_PER_SECOND` messages a second (80 by
default, 400 for text on request) and answers a burst beyond its REST concurrency with 429. The
`limits` library keeps a moving window per sender: in Redis (REDIS_URL) when the queue is there,
so every consumer on every dyno draws from the same budget; in process memory on the embedded
SQLite default, where one worker process is the deployment. A send waits for a slot rather than
meeting a 429; a 429 or 63018 from Twilio drains the rest of the current second for everyone.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from flask import Flask, current_app
from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

#: Worker threads build the limiter once between them: two in-memory budgets would each allow the rate.
_build_lock = threading.Lock()
#: The longest a send waits for a slot before it gives up and is retried later.
MAX_WAIT_SECONDS = 30.0


class SendRateLimit:
    """A moving-window limit of `per_second` sends for each sender."""

    def __init__(self, per_second: int, storage_uri: str, namespace: str) -> None:
        self.item = RateLimitItemPerSecond(per_second)
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self.namespace = namespace

    def acquire(self, sender: str, max_wait: float = MAX_WAIT_SECONDS,
                cancelled: Callable[[], bool] | None = None) -> bool:
        """Take one slot for `sender`, waiting as long as the window needs; False after `max_wait`,
        or as soon as `cancelled()` says the wait is pointless (the worker is stopping)."""
        deadline = time.monotonic() + max_wait
        while True:
            if cancelled is not None and cancelled():
                return False
            if self.limiter.hit(self.item, self.namespace, sender):
                return True
            reset_at = self.limiter.get_window_stats(self.item, self.namespace, sender).reset_time
            wait = min(max(reset_at - time.time(), 0.001), 0.25)  # re-check often: others free slots too
            if time.monotonic() + wait > deadline:
                return False
            time.sleep(wait)

    def slow_down(self, sender: str) -> None:
        """Twilio said "too fast" (429, 63018): spend what is left of this second, for every worker."""
        remaining = self.limiter.get_window_stats(self.item, self.namespace, sender).remaining
        if remaining > 0:
            self.limiter.hit(self.item, self.namespace, sender, cost=remaining)
        log.warning("Twilio asked us to slow down: sends from %s pause for the rest of this second", sender)


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
