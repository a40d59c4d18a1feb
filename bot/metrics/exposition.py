"""One scrape, the whole story: the families `GET /metrics` serves, gathered per scrape.

Three sources, one registry per scrape:

- the database and the queue, read now (`bot.metrics.readings`) and turned into gauges;
- what every process counted (`bot.metrics.counters`), read back from the shared store;
- the web's request histograms (`bot.metrics.http_timing`), summed over gunicorn's workers by
  prometheus_client's multiprocess collector when PROMETHEUS_MULTIPROC_DIR is set.

docs/metrics.md lists every family.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from bot.extensions import db
from bot.metrics import counters, http_timing
from bot.metrics.readings import Readings, read_readings

#: What Prometheus expects for the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = counters.PREFIX


def readings_families(readings: Readings) -> list[Metric]:
    """The gauges of one reading of the database and the queue."""
    up = GaugeMetricFamily(P + "up", "Whether a dependency answered this scrape (1) or not (0)", labels=["dependency"])
    up.add_metric(["database"], 1.0 if readings.database_up else 0.0)
    up.add_metric(["queue"], 1.0 if readings.queue_up else 0.0)
    messages = GaugeMetricFamily(P + "messages", "Messages stored, by channel, direction and status (final "
                                 "statuses estimated when bot_messages_estimated is 1)",
                                 labels=["channel", "direction", "status"])
    for (channel, direction, status), count in sorted(readings.messages.items()):
        messages.add_metric([channel, direction, status], count)
    estimated = GaugeMetricFamily(P + "messages_estimated", "1 when the final statuses' counts in bot_messages "
                                  "are PostgreSQL's estimate (a big table), 0 when counted")
    if readings.database_up:
        estimated.add_metric([], 1.0 if readings.messages_estimated else 0.0)
    failed = GaugeMetricFamily(P + "messages_failed_24h", "Outbound messages that failed for good (failed, "
                               "undelivered) in the last 24 hours, by channel and error code",
                               labels=["channel", "error_code"])
    for (channel, code), count in sorted(readings.failed_by_error_code.items()):
        failed.add_metric([channel, "" if code == "none" else code], count)
    oldest = GaugeMetricFamily(P + "oldest_pending_age_seconds", "Age of the oldest outbound message waiting to "
                               "leave (pending, dispatching, retrying), per queue lane; 0 when none",
                               labels=["lane"])
    for lane, age in readings.oldest_pending_age_seconds.items():
        oldest.add_metric([lane], age)
    depth = GaugeMetricFamily(P + "queue_depth", "Tasks waiting on the queue, per lane", labels=["lane"])
    for lane, count in readings.queue_depth.items():
        depth.add_metric([lane], count)
    scheduled = GaugeMetricFamily(P + "queue_scheduled", "Tasks scheduled for later (retries waiting out a delay)")
    if readings.queue_up:
        scheduled.add_metric([], readings.queue_scheduled)
    events = GaugeMetricFamily(P + "events", "Events to a receiver still to deliver (pending, delivering) or "
                               "given up on (failed)", labels=["receiver", "status"])
    for (receiver, status), count in sorted(readings.events.items()):
        events.add_metric([receiver, status], count)
    event_age = GaugeMetricFamily(P + "events_oldest_pending_age_seconds", "Age of the oldest event still to "
                                  "deliver; 0 when none")
    handoff = GaugeMetricFamily(P + "contacts_in_handoff", "Contacts a person is answering now")
    conversations = GaugeMetricFamily(P + "conversations_active", "Open conversations (starting, active), by flow",
                                      labels=["flow"])
    if readings.database_up:
        event_age.add_metric([], readings.oldest_event_age_seconds)
        handoff.add_metric([], readings.contacts_in_handoff)
        for flow, count in sorted(readings.conversations_active.items()):
            conversations.add_metric([flow], count)
    return [up, messages, estimated, failed, oldest, depth, scheduled, events, event_age, handoff, conversations]


class ReadingsCollector(Collector):
    """The database and the queue, read at scrape time (in the request's app context)."""

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        readings = read_readings(db.session)
        yield from readings_families(readings)
        took = GaugeMetricFamily(P + "readings_duration_seconds", "Seconds this scrape took to read the database "
                                 "and the queue")
        took.add_metric([], time.perf_counter() - started)
        yield took


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\}$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')


def parse_key(key: str) -> tuple[str, dict[str, str]] | None:
    """A store key (`name{a="b"}`) back into its name and labels; None for a malformed one."""
    match = _SAMPLE.match(key)
    if match is None:
        return None
    return match["name"], dict(_LABEL.findall(match["labels"]))


class SharedCountersCollector(Collector):
    """Every process's counts, as the shared store adds them up (worker and web alike)."""

    def collect(self) -> Iterator[Metric]:
        samples: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for key, value in counters.totals().items():
            parsed = parse_key(key)
            if parsed is None:
                continue
            name, labels = parsed
            family = _family_of(name)
            if family is not None:
                samples.setdefault(family.name, []).append((name, labels, value))
        for family in counters.FAMILIES.values():
            yield _metric(family, samples.get(family.name, []))


def _family_of(sample_name: str) -> counters.Family | None:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample_name.endswith(suffix):
            family = counters.FAMILIES.get(sample_name[: -len(suffix)])
            if family is not None:
                return family
    return None


def _metric(family: counters.Family, samples: list[tuple[str, dict[str, str], float]]) -> Metric:
    if family.kind == "counter":
        metric: Any = CounterMetricFamily(family.name, family.help, labels=list(family.labels))
        for _, labels, value in sorted(samples, key=lambda s: sorted(s[1].items())):
            metric.add_metric([labels.get(name, "") for name in family.labels], value)
        return metric
    metric = HistogramMetricFamily(family.name, family.help, labels=list(family.labels))
    series: dict[tuple[str, ...], dict[str, Any]] = {}
    for name, labels, value in samples:
        key = tuple(labels.get(label, "") for label in family.labels)
        entry = series.setdefault(key, {"buckets": {}, "sum": 0.0})
        if name.endswith("_bucket"):
            entry["buckets"][labels.get("le", "+Inf")] = value
        elif name.endswith("_sum"):
            entry["sum"] = value
    for key, entry in sorted(series.items()):
        bounds = [counters._le(bound) for bound in family.buckets] + ["+Inf"]
        # A bucket no observation fell into was never written: 0 (buckets are stored cumulative).
        buckets, running = [], 0.0
        for bound in bounds:
            running = max(running, entry["buckets"].get(bound, 0.0))
            buckets.append((bound, running))
        metric.add_metric(list(key), buckets, entry["sum"])
    return metric


def scrape_registry() -> CollectorRegistry:
    """A registry for one scrape: the readings, the shared counters and the request histograms."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReadingsCollector())
    registry.register(SharedCountersCollector())
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.isdir(directory):
        MultiProcessCollector(registry, path=directory)
    else:
        registry.register(_ProcessHistograms())
    return registry


class _ProcessHistograms(Collector):
    """This process's request histograms (no multiprocess directory: one process serves)."""

    def collect(self) -> Iterator[Metric]:
        yield from http_timing.PROCESS_REGISTRY.collect()


def render() -> bytes:
    """The text format of one scrape."""
    return generate_latest(scrape_registry())
