"""Wire metrics into an app: where this process's counts go, and the request timing hooks.

Metrics are on when METRICS_TOKEN is set (without it `/metrics` is a 404 and nothing is
timed or counted, docs/metrics.md). Both processes call this from create_app: the web to time
its requests and flush what it counts (a fallback decided by a status callback), the worker to
flush what its sends count.
"""
from __future__ import annotations

from flask import Flask

from bot.config import queue_file
from bot.metrics import counters
from bot.metrics.shared_store import RedisStore, SqliteStore


def init_app(app: Flask) -> None:
    """Turn metrics on for `app` when METRICS_TOKEN is set."""
    if not app.config.get("METRICS_TOKEN"):
        counters.configure(None, app.config.get("METRICS_FLUSH_SECONDS", 5.0), enabled=False)
        return
    queue_name = app.config.get("QUEUE_NAME") or "whatsapp-bot"
    redis_url = app.config.get("REDIS_URL")
    store = (RedisStore(redis_url, queue_name) if redis_url
             else SqliteStore(queue_file(app.instance_path), queue_name))
    counters.configure(store, app.config.get("METRICS_FLUSH_SECONDS", 5.0))
    # Only here: without METRICS_TOKEN a process never imports prometheus_client (2.3 MiB, 32 modules).
    from bot.metrics import http_timing

    http_timing.init_app(app)
