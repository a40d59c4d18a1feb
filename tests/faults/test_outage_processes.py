"""Outages against real processes: the Procfile's release, web (gunicorn) and worker (huey_consumer)
lines, talking to PostgreSQL and Redis through TCP proxies (tests/tcp_proxy.py) that the tests cut
and restore. The machine's services keep running: only the way to them is cut.

Each test counts what really happened: webhooks and requests accepted, rows stored, duplicates,
replies and sends at the simulator, and what was lost (nothing).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import outbox
from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from bot.models import Message, StatusEvent
from tests.conftest import ACCOUNT_SID, API_TOKEN, AUTH_TOKEN
from tests.tcp_proxy import TcpProxy
from tests.faults.test_processes import _healthy, env_for, free_port, procfile, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.environ.get("TEST_DATABASE_URL", "").startswith("postgres") and os.environ.get("TEST_REDIS_URL")),
        reason="needs PostgreSQL and Redis (TEST_DATABASE_URL, TEST_REDIS_URL): a TCP proxy is cut in front of "
               "them; the SQLite default has no connection to cut (tests/delivery/test_outage.py covers it in process)"),
]

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
#: How long the outage lasts.
OUTAGE_SECONDS = 20


def web_workers(master_pid: int) -> set[int]:
    """The pids of gunicorn's worker processes (the master's children)."""
    path = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return {int(pid) for pid in path.read_text().split()} if path.exists() else set()


@pytest.fixture
def stack_settings() -> dict[str, str]:
    """Extra environment for the stack's processes (a test parametrizes it to change one)."""
    return {}


@pytest.fixture
def proxied_stack(base_config, _schema, app, tmp_path, stack_settings) -> Iterator[dict[str, Any]]:
    """release, web and worker from the Procfile, their PostgreSQL and Redis behind proxies."""
    database_proxy = TcpProxy.for_url(base_config["DATABASE_URL"]).start()
    redis_proxy = TcpProxy.for_url(base_config["REDIS_URL"]).start()
    port = free_port()
    webhook_url = f"http://127.0.0.1:{port}/twilio/webhook"
    # Only "sent" comes by itself: the tests post the later callbacks when it suits them.
    simulator = TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, webhook_url=webhook_url, auto_callbacks=True,
                                callback_statuses=("sent",), callback_delay=0.05).start()
    config = {**base_config, "TWILIO_API_URL": simulator.url, "TWILIO_WEBHOOK_URL": webhook_url,
              "DATABASE_URL": database_proxy.url_through(base_config["DATABASE_URL"]),
              "REDIS_URL": redis_proxy.url_through(base_config["REDIS_URL"])}
    env = env_for(config, PORT=str(port), WEB_CONCURRENCY="2", WORKER_THREADS="4", **stack_settings)
    commands = procfile()
    subprocess.run(["bash", "-c", commands["release"]], env=env, cwd=tmp_path, check=True, timeout=60,
                   capture_output=True)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("web", "worker")}
    processes = {
        name: subprocess.Popen(["bash", "-c", "exec " + commands[name].strip()], env=env, cwd=tmp_path,
                               stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)
        for name in ("web", "worker")
    }
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(base), what="gunicorn to answer /healthz")
        yield {"base": base, "simulator": simulator, "database": database_proxy, "redis": redis_proxy,
               "processes": processes, "logs": tmp_path}
    finally:
        database_proxy.restore()
        redis_proxy.restore()
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        simulator.stop()
        database_proxy.stop()
        redis_proxy.stop()
        for name, log in logs.items():
            log.close()
            text = (tmp_path / f"{name}.log").read_text()
            assert AUTH_TOKEN not in text and API_TOKEN not in text, f"secret leaked in the {name} log"
            assert not re.findall(r"(?:\+|%2[Bb])\d{11}", text), f"full phone numbers in the {name} log"


def rows(app, statement):
    with app.app_context():
        db.session.remove()
        return db.session.execute(statement).all()


def health(base: str) -> tuple[int, dict[str, Any]]:
    response = requests.get(base + "/healthz", timeout=5)
    return response.status_code, response.json()


def inbound(simulator: TwilioSimulator, phone: str, body: str, sid: str | None = None) -> requests.Response:
    """A signed inbound message, as Twilio posts it (`sid`: repeat an earlier one, as a retry)."""
    sid = sid or "SM" + uuid.uuid4().hex
    return simulator.send_inbound(phone, body, extra={"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid})


def replies_to(simulator: TwilioSimulator) -> Counter:
    return Counter(message["to"].removeprefix("whatsapp:") for message in simulator.messages)


def test_inbound_and_callbacks_survive_a_database_outage_without_restarts(proxied_stack, app):
    stack = proxied_stack
    base, simulator, database = stack["base"], stack["simulator"], stack["database"]
    before = [f"+1555400{i:04d}" for i in range(10)]
    during = [f"+1555410{i:04d}" for i in range(20)]

    # Before: ten people write and get their welcome; the "sent" callbacks are recorded.
    for phone in before:
        assert inbound(simulator, phone, "hello").status_code == 200
    welcomes = wait_until(lambda: (lambda m: m if len(m) >= len(before) else None)(simulator.messages),
                          timeout=60, what="the welcome replies")
    wait_until(lambda: rows(app, sa.select(sa.func.count()).select_from(StatusEvent))[0][0] >= len(before),
               timeout=30, what="the 'sent' callbacks to be recorded")
    web_pids = web_workers(stack["processes"]["web"].pid)
    assert web_pids

    # The outage: open connections reset, new ones refused, for OUTAGE_SECONDS.
    database.cut()
    cut_at = time.monotonic()
    code, body = health(base)
    assert code == 503 and body["database"].startswith("unavailable") and body["queue"] == "ok", body
    answers: Counter = Counter()
    sids: list[str] = []
    callbacks = [(m["sid"], status) for status in ("delivered", "read") for m in welcomes]
    pace = OUTAGE_SECONDS * 0.8 / (len(during) + len(callbacks))
    for i, phone in enumerate(during):
        sid = "SM" + uuid.uuid4().hex
        sids.append(sid)
        answers[inbound(simulator, phone, "hello", sid).status_code] += 1
        if i % 4 == 0:  # Twilio retrying a webhook: the same MessageSid again
            answers[inbound(simulator, phone, "hello", sid).status_code] += 1
        time.sleep(pace)
    for sid, status in callbacks:
        answers[simulator.send_status_callback(sid, status).status_code] += 1
        time.sleep(pace)
    assert database.is_cut and time.monotonic() - cut_at < OUTAGE_SECONDS + 5
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
    database.restore()
    outage = time.monotonic() - cut_at

    # Afterwards: every message stored once and answered, every callback applied, no restart.
    wait_until(lambda: all(replies_to(simulator)[phone] >= 1 for phone in during), timeout=90,
               what="every message received during the outage to be answered")
    wait_until(lambda: {s for (s,) in rows(app, sa.select(Message.status).where(
        Message.twilio_sid.in_([m["sid"] for m in welcomes])))} == {"read"}, timeout=30,
        what="every callback of the outage to be applied")
    stored = Counter(sid for (sid,) in rows(app, sa.select(Message.twilio_sid).where(Message.direction == "inbound")))
    events = Counter(rows(app, sa.select(StatusEvent.twilio_sid, StatusEvent.status)))
    posted = sum(answers.values())
    assert answers == {200: posted}, answers  # never a 500 (nor a 503: the queue was up)
    assert all(w["status_code"] == 200 for w in simulator.webhooks), [w for w in simulator.webhooks if w["status_code"] != 200]
    assert all(stored[sid] == 1 for sid in sids) and len(stored) == len(before) + len(during)
    assert all(events[(sid, status)] == 1 for sid, status in callbacks)
    assert all(replies_to(simulator)[phone] == 1 for phone in during)  # answered once, not twice
    assert health(base)[0] == 200
    assert all(process.poll() is None for process in stack["processes"].values())
    assert web_workers(stack["processes"]["web"].pid) == web_pids  # no gunicorn worker was replaced
    # Every webhook of the outage went through the queue, and the worker waited for the database.
    web_log = (stack["logs"] / "web.log").read_text()
    queued = Counter(re.findall(r"webhook (SM[0-9a-f]+) queued for the worker to store", web_log))
    expected = Counter([sid for sid in sids for _ in range(2 if sids.index(sid) % 4 == 0 else 1)]
                       + [sid for sid, _ in callbacks])
    assert sum(expected.values()) == posted and not expected - queued, expected - queued
    # Besides those, only the simulator's own "sent" callback of a reply can meet the outage's
    # edge (a reply leaves as soon as its turn commits: docs/ARCHITECTURE.md, "Inbound"); it is
    # queued like any other, never lost.
    assert set(queued - expected) <= {m["sid"] for m in simulator.messages}, queued - expected
    assert "tried again in" in (stack["logs"] / "worker.log").read_text()
    inbound_posts = len(during) + len(range(0, len(during), 4))
    print(f"\ndatabase outage of {outage:.0f} s: inbound {inbound_posts} accepted (200), "
          f"{len(during)} distinct stored once, {inbound_posts - len(during)} duplicates ignored, "
          f"{len(during)} answered, 0 lost; status callbacks {len(callbacks)} accepted, {len(callbacks)} applied, "
          f"0 lost; web and worker not restarted")


def test_notifications_accepted_while_redis_is_down_are_sent_exactly_once(proxied_stack, app):
    stack = proxied_stack
    base, simulator, redis_proxy = stack["base"], stack["simulator"], stack["redis"]
    phones = [f"+1555420{i:04d}" for i in range(5)]
    for phone in phones:  # they subscribe (and open their 24-hour window)
        assert inbound(simulator, phone, "START").status_code == 200
    wait_until(lambda: len(simulator.messages) >= len(phones), timeout=60, what="the opt-in confirmations")
    confirmations = len(simulator.messages)

    def notify(i: int, key: str | None = None) -> requests.Response:
        headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
        return requests.post(base + "/notify", json={"to": phones[i % len(phones)], "body": f"notice {i}"},
                             headers=headers, timeout=10)

    accepted: dict[str, str] = {}  # body -> message id
    duplicates = 0
    answers: Counter = Counter()
    for i in range(5):
        response = notify(i)
        answers[response.status_code] += 1
        accepted[f"notice {i}"] = response.json()["id"]
    redis_proxy.cut()
    code, body = health(base)
    assert code == 503 and body["queue"].startswith("unavailable") and body["database"] == "ok", body
    for i in range(5, 35):
        key = f"outage-{i}"
        response = notify(i, key)
        answers[response.status_code] += 1
        accepted[f"notice {i}"] = response.json()["id"]
        if i % 5 == 0:  # the backend retries a request whose answer it did not see
            again = notify(i, key)
            answers[again.status_code] += 1
            duplicates += 1
            assert again.json()["id"] == accepted[f"notice {i}"]
        time.sleep(0.3)
    redis_proxy.restore()
    for i in range(35, 40):
        response = notify(i)
        answers[response.status_code] += 1
        accepted[f"notice {i}"] = response.json()["id"]
    assert answers == {202: len(accepted) + duplicates}, answers

    # What the dead queue never got, the outbox sweep enqueues (the worker runs it every
    # minute for rows a minute old; here it runs now, as if that minute had passed).
    with app.app_context():
        swept = outbox.sweep(now=utcnow() + timedelta(minutes=2))
    sent = wait_until(lambda: (lambda bodies: bodies if set(accepted) <= set(bodies) else None)(
        Counter(m["body"] for m in simulator.messages)), timeout=90, what="every accepted notification to be sent")
    wait_until(lambda: not rows(app, sa.select(Message.id).where(Message.direction == "outbound",
                                                                   Message.status.in_(("pending", "dispatching")))),
               timeout=30, what="every send to be recorded")
    time.sleep(2)  # anything sent twice would arrive now
    sent = Counter(m["body"] for m in simulator.messages)
    assert all(sent[body] == 1 for body in accepted), {b: n for b, n in sent.items() if n != 1}
    assert len(simulator.messages) == confirmations + len(accepted)
    recorded = dict(rows(app, sa.select(Message.id, Message.twilio_sid).where(Message.id.in_(accepted.values()))))
    assert all(recorded[message_id] for message_id in accepted.values())
    assert health(base)[0] == 200
    assert all(process.poll() is None for process in stack["processes"].values())
    print(f"\nredis outage: {len(accepted) + duplicates} /notify answered 202 ({len(accepted)} distinct, "
          f"{duplicates} idempotent repeats), the sweep re-enqueued {swept['outbound']}; "
          f"{len(accepted)} sent exactly once, 0 twice, 0 lost; web and worker not restarted")


@pytest.mark.parametrize("stack_settings", [{"TWILIO_MESSAGES_PER_SECOND": "2"}])
def test_sends_waiting_for_rate_slots_when_redis_is_cut_are_sent_once_it_is_back(proxied_stack, app, stack_settings):
    """Issue 15, item 0, through the real processes: a backlog waits for slots of a 2-a-second
    sender when Redis (the shared rate budget, and the queue) is cut for 8 s. The waiting sends
    wait for Redis, not fail; once it is back every message is sent exactly once, in each
    contact's order."""
    stack = proxied_stack
    base, simulator, redis_proxy = stack["base"], stack["simulator"], stack["redis"]
    phones = [f"+1555430{i:04d}" for i in range(6)]
    for phone in phones:
        assert inbound(simulator, phone, "START").status_code == 200
    wait_until(lambda: len(simulator.messages) >= len(phones), timeout=60, what="the opt-in confirmations")
    confirmations = len(simulator.messages)

    accepted: dict[str, str] = {}  # body -> message id, in creation order
    for round_ in range(4):
        for i, phone in enumerate(phones):
            body = f"notice {round_} to {i}"
            response = requests.post(base + "/notify", json={"to": phone, "body": body}, headers=AUTH, timeout=10)
            assert response.status_code == 202, response.text
            accepted[body] = response.json()["id"]
    time.sleep(1)
    redis_proxy.cut()
    sent_at_cut = len(simulator.messages) - confirmations
    time.sleep(8)
    redis_proxy.restore()
    # A task the dead queue lost would wait for the sweep's next round; run it now, as if its
    # hold-off had passed (nothing is `retrying`: no wait outlasted its 30 s).
    with app.app_context():
        outbox.sweep(now=utcnow() + outbox.REENQUEUE_AFTER + timedelta(minutes=1))

    ids = list(accepted.values())

    def settled():
        states = dict(rows(app, sa.select(Message.id, Message.status).where(Message.id.in_(ids))))
        if "failed" in states.values():
            return states  # fail fast: the old behaviour
        return states if all(status not in ("pending", "dispatching", "retrying") for status in states.values()) else None

    states = wait_until(settled, timeout=120, what="every notification to be sent")
    time.sleep(2)  # anything sent twice would arrive now
    assert sent_at_cut < len(accepted), "the cut came after the backlog was gone: nothing waited for a slot"
    assert "failed" not in states.values(), {i: s for i, s in states.items() if s == "failed"}
    sent = [m["body"] for m in simulator.messages[confirmations:]]
    assert Counter(sent) == Counter(list(accepted)), {b: n for b, n in Counter(sent).items() if n != 1}
    for i, phone in enumerate(phones):  # each contact's notices in the order they were created
        to_this = [b for b in sent if b.endswith(f" to {i}")]
        assert to_this == [f"notice {r} to {i}" for r in range(4)], to_this
    worker_log = (stack["logs"] / "worker.log").read_text()
    assert "rate limit's Redis is unreachable" in worker_log  # the sends met the cut while waiting
    assert health(base)[0] == 200
    assert all(process.poll() is None for process in stack["processes"].values())
    print(f"\nredis cut for 8 s under a 2/s backlog: {len(accepted)} notifications, {sent_at_cut} sent before "
          f"the cut, the rest waited for Redis; {len(accepted)} sent exactly once, 0 failed, 0 twice, order kept")
