"""Each request's latency, by route, method and status: a prometheus_client histogram.

gunicorn runs several worker processes; each one's observations are added up by
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set and cleaned by
bot/gunicorn_config.py; a dead worker's files are marked by its `child_exit` hook), so any
worker's scrape shows every worker's requests. Without that directory (the development server,
tests) the histogram lives in this process's memory and is served from it.

The route label is the URL rule (`/messages/<message_id>`), never the path: bounded, no ids.
"""
from __future__ import annotations

import time

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Histogram

#: Seconds; the web aims for milliseconds (docs/ARCHITECTURE.md, "Web answers fast"), Twilio
#: gives up after 15.
BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)
#: The route label of a request no rule matched (a 404, a 405).
UNMATCHED = "unmatched"
_STARTED = "bot.metrics.started"

#: The histogram's own registry: served as is when there is no multiprocess directory.
PROCESS_REGISTRY = CollectorRegistry()
REQUEST_DURATION = Histogram("bot_http_request_duration_seconds", "Seconds from a request reaching the app to its "
                             "answer, by route (the URL rule), method and status",
                             ("route", "method", "status"), buckets=BUCKETS, registry=PROCESS_REGISTRY)
_children: dict[tuple[str, str, int], object] = {}


def init_app(app: Flask) -> None:
    """Time every request of `app` (two hooks: a clock reading, then one observation)."""
    app.before_request(_start)
    app.after_request(_observe)


def _start() -> None:
    request.environ[_STARTED] = time.perf_counter()


def _observe(response: Response) -> Response:
    started = request.environ.get(_STARTED)
    if started is not None:
        rule = request.url_rule
        key = (rule.rule if rule is not None else UNMATCHED, request.method, response.status_code)
        child = _children.get(key)
        if child is None:  # labels() validates and locks; a dict lookup is all a known key needs
            child = _children[key] = REQUEST_DURATION.labels(key[0], key[1], str(key[2]))
        child.observe(time.perf_counter() - started)  # type: ignore[attr-defined]
    return response
