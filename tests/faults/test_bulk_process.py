"""The bulk process through real processes (bot/delivery/bulk_process.py): the Procfile's worker
line on Redis starts a child that runs a broadcast's work, at a lower CPU priority; a conversation
turn's reply never waits for it; a SIGKILLed worker takes it along and a SIGTERM stops both in
time, and every recipient gets exactly one message (invariants 1, 2 and 16)."""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from bot import create_app
from bot.delivery import outbox, tasks
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Message
from tests.conftest import in_process_queue_options
from tests.faults.test_broadcast_processes import wait_completed
from tests.faults.test_processes import FROZEN, running_stack, wait_until
from tests.faults.test_worker_faults import AUTH, add_contacts, posts

TEMPLATE = {"template": "order_update", "variables": {"1": "there", "2": "late opening"}}


@pytest.fixture
def config(base_config: dict[str, Any], redis_url: str | None, app) -> Iterator[dict[str, Any]]:
    """The stack's settings; this process's queue routes as the stack's (the sweeps it runs
    enqueue a broadcast's tasks on the bulk queue, as the worker's would)."""
    if not redis_url:
        pytest.skip("the bulk process runs on Redis only (the SQLite default keeps the lane in the worker)")
    # Eight broadcast sends a second (80% of ten): each test's signal lands mid-broadcast.
    config = {**base_config, "BULK_WORKER_PROCESS": True, "BULK_WORKER_THREADS": 4, "TWILIO_MESSAGES_PER_SECOND": 10,
              "BROADCAST_RATE_SHARE": 0.8, "TWILIO_TIMEOUT": 5}
    routing = create_app({**config, "TESTING": True, "HUEY_STORAGE_OPTIONS": in_process_queue_options(config)})
    assert set(huey.queues) == {"main", "bulk"}
    yield config
    with routing.app_context():
        db.session.remove()
        db.engine.dispose()


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux's /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def thread_niceness(pid: int, tid: str) -> int:
    """A thread's niceness (field 19 of its /proc stat line)."""
    return int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def thread_policies(pid: int) -> set[int]:
    """The scheduling classes of a process's threads (those that ended meanwhile left out)."""
    policies = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            policies.add(os.sched_getscheduler(int(tid)))
    return policies


def bulk_child(stack: dict[str, Any]) -> int:
    return wait_until(lambda: next(iter(children(stack["worker_pid"]())), None), timeout=60,
                      what="the worker to start its bulk process")


def start_broadcast(base: str, phones: list[str], key: str) -> str:
    answer = requests.post(base + "/broadcasts", json={"audience": {"phones": phones}, **TEMPLATE},
                           headers={**AUTH, "Idempotency-Key": key}, timeout=10)
    assert answer.status_code == 202, answer.text
    return base + answer.json()["url"]


def broadcast_posts(simulator, phones: list[str]) -> int:
    wanted = {f"whatsapp:{phone}" for phone in phones}
    return sum(1 for request in posts(simulator) if request.get("form", {}).get("To") in wanted)


def assert_each_once(simulator, phones: list[str], url: str) -> None:
    received = collections.Counter(m["to"] for m in simulator.messages)
    assert {to: n for to, n in received.items() if to in {f"whatsapp:{p}" for p in phones}} == \
        {f"whatsapp:{phone}": 1 for phone in phones}  # nothing lost, nothing sent twice
    counts = requests.get(url, headers=AUTH, timeout=10).json()
    assert (counts["recipients"], counts["sent"], counts["failed"]) == (len(phones), len(phones), {})


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_broadcast_is_sent_by_the_bulk_process_while_the_worker_answers(config, _schema, app, tmp_path):
    phones = add_contacts(app, 60)
    with running_stack(config, tmp_path, latency=0.05) as stack:
        simulator, base = stack["simulator"], stack["base"]
        child = bulk_child(stack)
        # Once it is a consumer, it runs at a lower CPU priority than its worker.
        wait_until(lambda: os.getpriority(os.PRIO_PROCESS, child) - os.getpriority(os.PRIO_PROCESS, stack["worker_pid"]())
                   == 10, timeout=60, what="the bulk process to lower its priority")
        # The worker and its bulk process each set what they loaded aside from the garbage
        # collector once they consume (bot/heap.py): a line each.
        wait_until(lambda: len(FROZEN.findall(stack["worker_log"]())) == 2, timeout=60,
                   what="the worker and its bulk process to freeze what they loaded")
        # Its log lines are masked as the worker's (bot/logmask.py): huey names a task by its id,
        # here a phone number (running_stack's teardown also finds no full number in the log).
        tasks.send_message.schedule(args=("no-such-message",), delay=0, id="+15550001234",
                                    priority=int(outbox.Priority.BROADCAST))
        wait_until(lambda: "Executing bot.delivery.tasks.send_message: +1555•••1234" in stack["worker_log"](),
                   timeout=60, what="the bulk process to run a task on the bulk queue")
        assert "+15550001234" not in stack["worker_log"]()

        url = start_broadcast(base, phones, "bulk-process-stop")
        wait_until(lambda: broadcast_posts(simulator, phones) >= 5, timeout=90, what="a first part to reach Twilio")

        os.kill(child, signal.SIGSTOP)
        try:
            time.sleep(2)  # calls already on the wire reach the simulator
            stopped_at = broadcast_posts(simulator, phones)
            assert stopped_at < len(phones), "the stop came too late to test anything"
            # A conversation turn and its reply: the worker, not the stopped child.
            assert simulator.send_inbound("+15550009999", "hello bot").status_code == 200
            wait_until(lambda: any(m["to"] == "whatsapp:+15550009999" for m in simulator.messages), timeout=60,
                       what="the worker's reply while the bulk process is stopped")
            time.sleep(3)
            assert broadcast_posts(simulator, phones) == stopped_at  # nobody else sends the broadcast
        finally:
            os.kill(child, signal.SIGCONT)

        wait_completed(app, url)
        assert_each_once(simulator, phones, url)
        assert children(stack["worker_pid"]()) == [child]  # the same child all along
        # Every thread of it, those that send included (Linux keeps a niceness per thread).
        assert {thread_niceness(child, tid) for tid in os.listdir(f"/proc/{child}/task")} == \
            {os.getpriority(os.PRIO_PROCESS, stack["worker_pid"]()) + 10}
        # ... and the idle class (Linux: a CPU running only them is idle to a waking turn's thread),
        # which the worker's own threads do not have.
        assert thread_policies(child) == {os.SCHED_IDLE}
        assert thread_policies(stack["worker_pid"]()) == {os.SCHED_OTHER}

        # A child that dies on its own is started again (its work is claims and sweeps: nothing lost).
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: [pid for pid in children(stack["worker_pid"]()) if pid != child and alive(pid)],
                   timeout=60, what="the worker to start another bulk process")
        assert "bulk process exited unexpectedly" in stack["worker_log"]()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_on_the_sqlite_queue_the_worker_keeps_a_broadcast_in_process(base_config, _schema, app, tmp_path):
    """The send rate budget is in the worker's memory there: one worker process, its bulk lane."""
    phones = add_contacts(app, 10)
    config = {**base_config, "REDIS_URL": None, "BULK_WORKER_PROCESS": True, "BULK_LANE_THREADS": 6}
    with running_stack(config, tmp_path, latency=0.05) as stack:
        url = start_broadcast(stack["base"], phones, "bulk-process-sqlite")
        wait_until(lambda: requests.get(url, headers=AUTH, timeout=10).json()["state"] == "completed", timeout=120,
                   what="the broadcast to complete")
        assert_each_once(stack["simulator"], phones, url)
        assert children(stack["worker_pid"]()) == []
        assert "bulk process" not in stack["worker_log"]()


def _broadcast_under_way(stack: dict[str, Any], phones: list[str], key: str) -> tuple[Any, int, int, str]:
    """A broadcast to `phones` started on the running stack, its first ten sends at Twilio:
    (the simulator, the worker's pid, its bulk process's pid, the broadcast's URL)."""
    simulator = stack["simulator"]
    worker, child = stack["worker_pid"](), bulk_child(stack)
    url = start_broadcast(stack["base"], phones, key)
    wait_until(lambda: broadcast_posts(simulator, phones) >= 10, timeout=90, what="a first part to reach Twilio")
    return simulator, worker, child, url


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_worker_takes_its_bulk_process_along_and_nothing_is_lost_or_sent_twice(
        config, _schema, app, tmp_path):
    phones = add_contacts(app, 60)
    with running_stack(config, tmp_path, latency=0.2, auto_callbacks=False) as stack:
        simulator, worker, child, url = _broadcast_under_way(stack, phones, "bulk-process-kill")

        os.kill(worker, signal.SIGKILL)  # the worker alone: its child learns it from the kernel
        wait_until(lambda: not alive(child), timeout=40, what="the bulk process to exit after its worker")
        assert stack["stop_worker"]() == -signal.SIGKILL
        assert broadcast_posts(simulator, phones) < len(phones), "the kill came too late to test anything"

        stack["start_worker"]()
        wait_completed(app, url)
        assert_each_once(simulator, phones, url)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_to_the_worker_stops_its_bulk_process_in_time_with_its_batch_recorded(
        config, _schema, app, tmp_path):
    phones = add_contacts(app, 60)
    with running_stack(config, tmp_path, latency=0.2, auto_callbacks=False) as stack:
        simulator, worker, child, url = _broadcast_under_way(stack, phones, "bulk-process-term")

        # To the worker alone (a container's stop signals its first process only): it passes it on.
        began = time.monotonic()
        os.kill(worker, signal.SIGTERM)
        wait_until(lambda: not alive(child) and not alive(worker), timeout=30, what="both processes to exit")
        assert time.monotonic() - began < 25
        assert stack["stop_worker"]() == 0
        assert stack["worker_log"]().count("worker stopping") >= 2  # the worker's and the child's drain
        assert broadcast_posts(simulator, phones) < len(phones), "the stop came too late to test anything"
        with app.app_context():
            db.session.remove()
            # What was on the wire is recorded with its SID; nothing is left claimed.
            claimed = db.session.scalar(sa.select(sa.func.count()).select_from(Message)
                                        .where(Message.status == "dispatching"))
            sent = db.session.scalar(sa.select(sa.func.count()).select_from(Message)
                                     .where(Message.twilio_sid.is_not(None)))
        assert claimed == 0
        assert sent == broadcast_posts(simulator, phones)

        stack["start_worker"]()
        wait_completed(app, url)
        assert_each_once(simulator, phones, url)
