"""The bulk queue (bot/delivery/queue.py): on Redis, a broadcast's tasks go to `<QUEUE_NAME>-bulk`
from every process, everything else to the main queue, and a bulk task's retry stays on the bulk
queue (docs/ARCHITECTURE.md, "Broadcasts"). On the SQLite default there is one queue."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from bot import create_app
from bot.delivery import outbox, tasks
from bot.delivery.queue import BULK_PRIORITIES, huey
from bot.extensions import db
from tests.conftest import (API_TOKEN, PUBLIC_BASE, WEBHOOK_URL, empty_tables, in_process_queue_options, inbound_form,
                            signed_headers)


@pytest.fixture
def build(base_config: dict[str, Any], _schema: None) -> Iterator[Any]:
    """Build apps with overrides; put the shared Huey back afterwards (as tests/http/test_health.py)."""
    saved = {name: getattr(huey, name) for name in ("name", "storage_class", "storage_kwargs", "storage", "queues",
                                                    "immediate")}
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        config = {**base_config, "TESTING": True, **overrides}
        app = create_app({**config, "HUEY_STORAGE_OPTIONS": in_process_queue_options(config)})
        apps.append(app)
        return app

    yield make

    for app in apps:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
    huey.flush()
    for name, value in saved.items():
        setattr(huey, name, value)


def depths() -> dict[str, int]:
    return {role: int(storage.queue_size()) for role, storage in huey.queues.items()}


def scheduled() -> dict[str, int]:
    return {role: int(storage.schedule_size()) for role, storage in huey.queues.items()}


def test_the_bulk_priorities_are_the_broadcasts() -> None:
    assert BULK_PRIORITIES == {int(outbox.Priority.BROADCAST), int(outbox.Priority.BROADCAST_PUMP)}


def test_a_broadcasts_tasks_go_to_the_bulk_queue_from_the_web_and_the_rest_to_the_main_one(
        build, redis_url: str | None) -> None:
    if not redis_url:
        pytest.skip("the bulk queue is on Redis only")
    app = build(BULK_WORKER_PROCESS=True)
    huey.flush()
    assert set(huey.queues) == {"main", "bulk"}
    # `<QUEUE_NAME>-bulk`, as huey's Redis storage names keys (letters and digits only).
    assert huey.queues["bulk"].queue_key == huey.queues["main"].queue_key.replace(".priority", "bulk.priority")
    assert huey.storage is huey.queues["main"]  # what this process (the web, the worker) consumes

    with app.app_context():
        assert outbox.enqueue(outbox.Work.SEND, "m-broadcast", outbox.Priority.BROADCAST)
        assert outbox.enqueue(outbox.Work.BROADCAST, "b-1", outbox.Priority.BROADCAST_PUMP)
        assert outbox.enqueue(outbox.Work.SEND, "m-reply", outbox.Priority.CONVERSATION)
        assert outbox.enqueue(outbox.Work.SEND, "m-notify", outbox.Priority.BULK)
        assert outbox.enqueue(outbox.Work.EVENT, "e-1", outbox.Priority.CONVERSATION)
    assert depths() == {"main": 3, "bulk": 2}
    assert {huey.deserialize_task(data).priority for data in huey.queues["bulk"].enqueued_items()} == BULK_PRIORITIES
    # A pump turn scheduled for later (tasks._schedule_pump) and a retry's delay: the bulk queue's schedule.
    tasks._schedule_pump("b-1", None, 30.0)
    tasks.send_message.schedule(args=("m-later",), delay=30, priority=int(outbox.Priority.CONVERSATION))
    assert depths() == {"main": 4, "bulk": 3}  # an eta task is enqueued, and scheduled once dequeued
    for role in ("main", "bulk"):
        while (task := huey.deserialize_task(huey.queues[role].dequeue()) if huey.queues[role].queue_size() else None):
            if task.eta:
                huey.add_schedule(task)  # what the consumer that dequeued it does
    assert scheduled() == {"main": 1, "bulk": 1}
    assert huey.pending_count() == 0 and huey.scheduled_count() == 2


def test_the_webs_requests_put_a_broadcast_on_the_bulk_queue_and_an_inbound_message_on_the_main_one(
        build, redis_url: str | None) -> None:
    if not redis_url:
        pytest.skip("the bulk queue is on Redis only")
    app = build(BULK_WORKER_PROCESS=True)
    huey.flush()
    client = app.test_client()
    answer = client.post("/broadcasts", headers={"Authorization": f"Bearer {API_TOKEN}"},
                         json={"audience": {"phones": ["+15552000001", "+15552000002"]}, "template": "order_update",
                               "variables": {"1": "there", "2": "late opening"}})
    assert answer.status_code == 202, answer.text
    assert depths() == {"main": 0, "bulk": 1}  # the pump's first turn
    form = inbound_form("+15552000003", "hello")
    assert client.post("/twilio/webhook", data=form, headers=signed_headers(WEBHOOK_URL, form),
                       base_url=PUBLIC_BASE).status_code == 200
    assert depths() == {"main": 1, "bulk": 1}  # the turn
    names = {role: [huey.deserialize_task(data).name for data in storage.enqueued_items()]
             for role, storage in huey.queues.items()}
    assert names == {"main": ["process_inbound"], "bulk": ["pump_broadcast"]}
    with app.app_context():
        empty_tables()


def test_the_bulk_process_consumes_the_bulk_queue_and_sends_the_rest_to_the_main_one(
        build, redis_url: str | None) -> None:
    if not redis_url:
        pytest.skip("the bulk queue is on Redis only")
    app = build(BULK_WORKER_PROCESS=True, BOT_QUEUE_LANE="bulk")
    huey.flush()
    assert huey.storage is huey.queues["bulk"]
    assert app.config["BULK_LANE_THREADS"] == 0  # a broadcast's work runs on the process's own threads

    with app.app_context():
        # What a broadcast's send and pump turn enqueue in the bulk process: events, a contact's
        # next message, the pump's next turn, the lane's give-back.
        assert outbox.enqueue(outbox.Work.EVENT, "e-1", outbox.Priority.CONVERSATION)
        assert outbox.enqueue(outbox.Work.SEND, "m-next", outbox.Priority.BULK)
        assert outbox.enqueue(outbox.Work.SEND, "m-broadcast", outbox.Priority.BROADCAST)
    assert depths() == {"main": 2, "bulk": 1}

    # huey's own retry of a bulk task, in the process that ran it: back on the bulk queue.
    task = huey.dequeue()
    assert task.priority == int(outbox.Priority.BROADCAST)
    huey._requeue_task(task, huey._get_timestamp())
    assert scheduled() == {"main": 0, "bulk": 1}
    # ... and its scheduler, reading this process's schedule, moves it back onto the bulk queue.
    [due] = huey.read_schedule(task.eta)
    huey.enqueue(due)
    assert depths() == {"main": 2, "bulk": 1}


def test_healthz_and_metrics_count_both_queues(build, redis_url: str | None) -> None:
    if not redis_url:
        pytest.skip("the bulk queue is on Redis only")
    from bot.metrics.readings import queue_depth

    app = build(BULK_WORKER_PROCESS=True)
    huey.flush()
    with app.app_context():
        outbox.enqueue(outbox.Work.SEND, "m-broadcast", outbox.Priority.BROADCAST)
        outbox.enqueue(outbox.Work.SEND, "m-reply", outbox.Priority.CONVERSATION)
    body = app.test_client().get("/healthz").get_json()
    assert body["queue"] == "ok" and body["queue_depth"] == {"main": 1, "bulk": 1}
    lanes, _ = queue_depth()
    assert lanes["broadcast"] == 1 and lanes["conversation"] == 1


def test_the_sqlite_default_has_one_queue(build, redis_url: str | None) -> None:
    """The send rate budget is in the worker's memory there: one worker process, the lane in it."""
    app = build(REDIS_URL=None, BULK_WORKER_PROCESS=True)
    assert huey.queues == {}
    with app.app_context():
        assert outbox.enqueue(outbox.Work.SEND, "m-broadcast", outbox.Priority.BROADCAST)
    assert huey.pending_count() == 1
    assert app.test_client().get("/healthz").get_json()["queue_depth"] == {"main": 1}
    huey.flush()
