"""A broadcast on the worker's bulk lane through real processes: a deploy's SIGTERM drains it
(what is on the wire is recorded, what waited goes back to the queue) and a SIGKILL loses
nothing; every recipient gets exactly one message (invariants 1, 2 and 16; bot/delivery/bulk_lane.py)."""
from __future__ import annotations

import collections
import signal
import time
from datetime import timedelta

import pytest
import requests

from bot.broadcasts import pump
from bot.clock import utcnow
from bot.delivery import outbox
from bot.extensions import db
from tests.faults.test_processes import running_stack, wait_until
from tests.faults.test_worker_faults import AUTH, add_contacts, posts

TEMPLATE = {"template": "order_update", "variables": {"1": "there", "2": "late opening"}}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_broadcast_on_the_bulk_lane_survives_sigterm_and_sigkill_and_sends_each_message_once(
        base_config, _schema, app, tmp_path):
    total = 60
    phones = add_contacts(app, total)
    # Eight a second (80% of ten), 200 ms per create: each stop lands with batches waiting for
    # their slots and on the wire.
    config = {**base_config, "BULK_LANE_THREADS": 6, "TWILIO_MESSAGES_PER_SECOND": 10, "BROADCAST_RATE_SHARE": 0.8,
              "TWILIO_TIMEOUT": 5}
    with running_stack(config, tmp_path, latency=0.2, auto_callbacks=False) as stack:
        simulator, base = stack["simulator"], stack["base"]
        answer = requests.post(base + "/broadcasts", json={"audience": {"phones": phones}, **TEMPLATE},
                               headers={**AUTH, "Idempotency-Key": "lane-faults"}, timeout=10)
        assert answer.status_code == 202, answer.text
        url = base + answer.json()["url"]

        wait_until(lambda: len(posts(simulator)) >= 10, timeout=60, what="a first part to reach Twilio")
        began = time.monotonic()
        assert stack["stop_worker"](signal.SIGTERM) == 0
        assert time.monotonic() - began < 25
        assert "worker stopping" in stack["worker_log"]()
        after_term = len(posts(simulator))
        assert after_term < total, "the stop came too late to test anything"

        stack["start_worker"]()  # the given-back work and the pump's next turn are on the queue
        wait_until(lambda: len(posts(simulator)) >= after_term + 10, timeout=60,
                   what="the broadcast to go on after the restart")
        stack["stop_worker"](signal.SIGKILL)
        assert len(posts(simulator)) < total, "the kill came too late to test anything"

        stack["start_worker"]()

        wait_completed(app, url, timeout=150)
        counts = requests.get(url, headers=AUTH, timeout=10).json()
        received = collections.Counter(m["to"] for m in simulator.messages)
        assert sorted(received) == sorted(f"whatsapp:{phone}" for phone in phones)  # nothing lost
        assert set(received.values()) == {1}  # nothing sent twice
        assert (counts["recipients"], counts["sent"], counts["failed"]) == (total, total, {})


def wait_completed(app, url: str, timeout: float = 180) -> None:
    """Wait for the broadcast at `url` to complete, running the sweeps as the worker's periodic
    tasks do (every minute, sooner here): a dead process's pump chain counts as lost, its claims
    are re-taken once their lease ran out."""
    def completed() -> bool:
        with app.app_context():
            db.session.remove()
            pump.sweep(now=utcnow() + pump.LOST_AFTER + timedelta(seconds=1))
            outbox.sweep()
        time.sleep(2)
        return requests.get(url, headers=AUTH, timeout=10).json()["state"] == "completed"

    wait_until(completed, timeout=timeout, what="the broadcast to complete")
