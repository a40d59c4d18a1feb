"""Where every process's counts add up, so the web's scrape can read the worker's.

- **Redis** (REDIS_URL set): one hash per queue name; a flush is one pipelined HINCRBYFLOAT per
  changed sample (one round trip), a scrape one HGETALL.
- **The SQLite queue file** (the embedded default, one host): a table beside huey's; a flush is
  one transaction of upserts, a scrape one SELECT. Chosen over prometheus_client's multiprocess
  directory because the web and the worker already share this file on that shape, it outlives
  either process's restart, and the web cleans its multiprocess directory when it starts, which
  would wipe a running worker's files (docs/metrics.md, "Where the worker's counts go").
"""
from __future__ import annotations

import sqlite3
from typing import Any

#: How long a flush or a scrape waits for Redis before giving up (the counts wait in memory).
REDIS_TIMEOUT_SECONDS = 2.0


class RedisStore:
    """Totals in one Redis hash, `<queue name>.metrics`."""

    def __init__(self, url: str, queue_name: str) -> None:
        import redis

        self.key = f"{queue_name}.metrics"
        self.client: Any = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                                socket_connect_timeout=REDIS_TIMEOUT_SECONDS)

    def add(self, deltas: dict[str, float]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, amount in deltas.items():
            pipe.hincrbyfloat(self.key, key, amount)
        pipe.execute()

    def totals(self) -> dict[str, float]:
        return {key.decode(): float(value) for key, value in self.client.hgetall(self.key).items()}

    def clear(self) -> None:
        self.client.delete(self.key)


class SqliteStore:
    """Totals in a table of the SQLite queue file, one row per sample, under the queue's name."""

    def __init__(self, filename: str, queue_name: str) -> None:
        self.filename, self.queue = filename, queue_name
        with self._connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS metric_totals (queue TEXT NOT NULL, key TEXT NOT NULL, "
                         "value REAL NOT NULL, PRIMARY KEY (queue, key))")

    def _connect(self) -> sqlite3.Connection:
        # The queue file's own settings (bot/delivery/queue.py): WAL, a 30 s lock timeout.
        conn = sqlite3.connect(self.filename, timeout=30)
        return conn

    def add(self, deltas: dict[str, float]) -> None:
        conn = self._connect()
        try:
            with conn:
                conn.executemany("INSERT INTO metric_totals (queue, key, value) VALUES (?, ?, ?) "
                                 "ON CONFLICT (queue, key) DO UPDATE SET value = value + excluded.value",
                                 [(self.queue, key, amount) for key, amount in deltas.items()])
        finally:
            conn.close()

    def totals(self) -> dict[str, float]:
        conn = self._connect()
        try:
            return dict(conn.execute("SELECT key, value FROM metric_totals WHERE queue = ?", (self.queue,)))
        finally:
            conn.close()

    def clear(self) -> None:
        conn = self._connect()
        try:
            with conn:
                conn.execute("DELETE FROM metric_totals WHERE queue = ?", (self.queue,))
        finally:
            conn.close()
