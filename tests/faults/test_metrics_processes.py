"""GET /metrics through the Procfile's real processes: gunicorn with two workers and huey_consumer.

Any worker's scrape must show every worker's requests (prometheus_client's multiprocess mode,
bot/gunicorn_config.py), a killed worker's counts must stay counted, a previous run's files must
be gone, and the consumer's sends must reach the web's scrape (docs/metrics.md).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_TOKEN
from tests.faults.test_processes import running_stack, wait_until

METRICS_TOKEN = "process-metrics-token"
pytestmark = pytest.mark.slow


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape on a fresh connection (so gunicorn may hand it to either worker), parsed."""
    with requests.Session() as session:
        response = session.get(base + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}",
                                                           "Connection": "close"}, timeout=10)
    assert response.status_code == 200, response.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (sample_name, sample_labels), value in samples.items()
               if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()))


def gunicorn_workers(master: int) -> list[int]:
    """The pids of the gunicorn master's children."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                children.append(int(entry.name))
    return children


def gunicorn_master(directory: Path) -> int:
    """The master's pid: the parent of the processes whose files are in the multiprocess directory."""
    for path in directory.glob("*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    raise AssertionError("no multiprocess file yet")


@pytest.mark.timeout(180)
def test_counts_add_up_across_two_gunicorn_workers_and_the_worker(base_config, _schema, app, tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left by a previous run")  # would break the scrape if read
    config: dict[str, Any] = {**base_config, "METRICS_TOKEN": METRICS_TOKEN, "METRICS_FLUSH_SECONDS": 0.3,
                              "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    workdir = tmp_path / "stack"
    workdir.mkdir()
    with running_stack(config, workdir) as stack:
        base, simulator = stack["base"], stack["simulator"]
        assert not (directory / "counter_1.db").exists(), "stale files are removed when gunicorn starts"
        before = scrape(base)
        # Nobody wrote first: outside the 24-hour window, a 422 each. At least 40, and on until both
        # gunicorn workers have answered some: which one accepts a new connection is the kernel's
        # choice, and one of them took all of a first 40 in a CI run.
        refused, pids = 0, set()
        while refused < 40 or (len(pids) < 2 and refused < 1000):
            with requests.Session() as session:
                response = session.post(base + "/notify", json={"to": f"+1555123{refused:04d}", "body": "hi"},
                                        headers={"Authorization": f"Bearer {API_TOKEN}", "Connection": "close"},
                                        timeout=10)
            assert response.status_code == 422, response.text
            refused += 1
            pids = {int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("histogram_*.db")}
        assert len(pids) == 2, f"both gunicorn workers served requests: {pids} after {refused}"

        def notify_422(samples: dict) -> float:
            return sample(samples, "bot_http_request_duration_seconds_count", route="/notify", method="POST",
                          status="422")

        for _ in range(6):  # whichever worker answers, the same total
            assert notify_422(scrape(base)) - notify_422(before) == refused

        # A worker killed: its counts still count, and the master's child_exit marks its files dead.
        master = gunicorn_master(directory)
        victim = gunicorn_workers(master)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in gunicorn_workers(master) and len(gunicorn_workers(master)) == 2,
                   what="gunicorn to replace the killed worker")
        for _ in range(4):
            assert notify_422(scrape(base)) - notify_422(before) == refused

        # The consumer's sends reach the web's scrape: a welcome reply to someone who wrote first.
        assert simulator.send_inbound("+15551239000", "hello bot", profile_name="Ada").status_code == 200
        simulator.wait_for_messages(1, timeout=30)
        accepted = wait_until(lambda: sample(scrape(base), "bot_sends_total", channel="whatsapp",
                                             outcome="accepted") - sample(before, "bot_sends_total",
                                                                          channel="whatsapp", outcome="accepted"),
                              timeout=20, what="the consumer's send to reach the scrape")
        assert accepted == 1
        # Twilio's status callbacks for it, counted by the web process that took each.
        wait_until(lambda: sample(scrape(base), "bot_provider_callbacks_total", channel="whatsapp", status="read")
                   - sample(before, "bot_provider_callbacks_total", channel="whatsapp", status="read") == 1,
                   timeout=20, what="the read receipt to be counted")
        final = scrape(base)
        assert sample(final, "bot_send_duration_seconds_count", channel="whatsapp") >= 1
        assert sample(final, "bot_up", dependency="database") == 1 and sample(final, "bot_up", dependency="queue") == 1
