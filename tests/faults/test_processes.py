"""End to end through real processes: the Procfile's release, web and worker lines.

gunicorn serves the web app, `huey_consumer` runs the tasks, the Twilio simulator answers the SDK
and posts signed status callbacks back to the web process. Nothing runs in immediate mode.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from bot.extensions import db
from bot.models import Message
from bot.devtools.simulator import TwilioSimulator
from tests.conftest import ACCOUNT_SID, API_TOKEN, AUTH_TOKEN

ROOT = Path(__file__).resolve().parents[2]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(config: dict[str, Any], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "DATABASE_URL", "REDIS_URL"))}
    for key, value in config.items():
        if value is None:
            continue
        env[key] = json.dumps(value) if isinstance(value, dict) else str(value)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    # No PYTHONPATH: `pip install -e .` makes wsgi importable from any directory, as on a host.
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running_stack(base_config: dict[str, Any], tmp_path: Path, **simulator_options: Any) -> Iterator[dict[str, Any]]:
    """release, then web + worker from the Procfile, against a simulator that calls back.

    Yields the web's base URL, the simulator, and controls for the worker: `stop_worker(sig)`
    (SIGTERM by default, as a deploy does; returns the exit code), `start_worker()`, `worker_log()`;
    and `web_log()`.
    """
    port = free_port()
    webhook_url = f"http://127.0.0.1:{port}/twilio/webhook"
    options = {"auto_callbacks": True, "callback_delay": 0.05, **simulator_options}
    simulator = TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, webhook_url=webhook_url, **options).start()
    config = {**base_config, "TWILIO_API_URL": simulator.url, "TWILIO_WEBHOOK_URL": webhook_url}
    env = env_for(config, PORT=str(port), WEB_CONCURRENCY="2", WORKER_THREADS="2")
    commands = procfile()
    # cwd outside the repository: nothing may depend on a developer's .env or instance/.
    subprocess.run(["bash", "-c", commands["release"]], env=env, cwd=tmp_path, check=True, timeout=60,
                   capture_output=True)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("web", "worker")}

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", "exec " + commands[name].strip()], env=env, cwd=tmp_path,
                                stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)

    def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
        if process.poll() is None:
            os.killpg(process.pid, sig)
        try:
            # Heroku's grace: 30 s between SIGTERM and SIGKILL.
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
            raise AssertionError("the process outlived the 30 s a host gives between SIGTERM and SIGKILL")

    processes = {name: start(name) for name in ("web", "worker")}

    def stop_worker(sig: int = signal.SIGTERM) -> int:
        return stop(processes["worker"], sig)

    def start_worker() -> None:
        processes["worker"] = start("worker")

    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(base), what="gunicorn to answer /healthz")
        yield {"base": base, "simulator": simulator, "stop_worker": stop_worker, "start_worker": start_worker,
               "worker_log": lambda: (tmp_path / "worker.log").read_text(),
               "web_log": lambda: (tmp_path / "web.log").read_text(),
               "worker_pid": lambda: processes["worker"].pid}
    finally:
        for process in processes.values():
            stop(process)
        simulator.stop()
        for name, log in logs.items():
            log.close()
            text = (tmp_path / f"{name}.log").read_text()
            # Secrets never reach the logs, nor full phone numbers (the access log's paths included).
            assert AUTH_TOKEN not in text and API_TOKEN not in text, f"secret leaked in {name} log"
            full_numbers = re.findall(r"(?:\+|%2[Bb])\d{11}", text)
            assert not full_numbers, f"full phone numbers in the {name} log: {full_numbers[:3]}"


@pytest.fixture
def stack(base_config, _schema, app, tmp_path) -> Iterator[dict[str, Any]]:
    """The Procfile's processes against a simulator that calls back (see running_stack)."""
    with running_stack(base_config, tmp_path) as running:
        yield running


def _healthy(base: str) -> bool:
    try:
        return requests.get(base + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def inbound_statuses(app) -> list[str]:
    with app.app_context():
        db.session.remove()
        return list(db.session.scalars(sa.select(Message.status).where(Message.direction == "inbound")))


def test_notification_travels_through_web_worker_and_twilio_callbacks(stack, app):
    base, simulator = stack["base"], stack["simulator"]
    auth = {"Authorization": f"Bearer {API_TOKEN}"}

    # A new user writes first (opening the 24-hour window): the worker's welcome flow answers.
    assert simulator.send_inbound("+15551230000", "hello bot", profile_name="Ada").status_code == 200
    [welcome] = simulator.wait_for_messages(1, timeout=20)
    assert welcome["to"] == "whatsapp:+15551230000" and "YES" in welcome["body"]
    assert simulator.send_inbound("+15551230000", "yes").status_code == 200
    simulator.wait_for_messages(2, timeout=20)

    response = requests.post(base + "/notify", json={"to": "+15551230000", "body": "Your order shipped"},
                             headers=auth, timeout=5)
    assert response.status_code == 202, response.text
    message_id = response.json()["id"]

    sent = wait_until(lambda: [m for m in simulator.messages if m["body"] == "Your order shipped"],
                      what="the notification to reach Twilio")[0]
    assert sent["to"] == "whatsapp:+15551230000"

    def read() -> dict | None:
        body = requests.get(f"{base}/messages/{message_id}", headers=auth, timeout=5).json()
        return body if body["status"] == "read" else None

    final = wait_until(read, what="the read receipt to be recorded")
    assert final["twilio_sid"] == sent["sid"]
    assert [e["status"] for e in final["events"]] == ["sent", "delivered", "read"]
    contact = requests.get(f"{base}/contacts/+15551230000", headers=auth, timeout=5).json()
    assert contact["consent"] == "opted_in" and contact["profile_name"] == "Ada"
    assert wait_until(lambda: inbound_statuses(app) == ["processed", "processed"],
                      what="both inbound messages to be processed")


def start_appointment(stack: dict[str, Any], phone: str) -> requests.Response:
    """`phone` subscribes, the backend starts an appointment reminder for Friday 16:00, and the
    reminder reaches the simulator. Returns the /notify answer."""
    simulator = stack["simulator"]
    simulator.send_inbound(phone, "START")
    simulator.wait_for_messages(1, timeout=20)
    response = requests.post(stack["base"] + "/notify", headers={"Authorization": f"Bearer {API_TOKEN}"},
                             timeout=5, json={"to": phone, "flow": "appointment",
                                              "variables": {"date": "Friday", "time": "16:00"}})
    assert response.status_code == 202, response.text
    reminder = simulator.wait_for_messages(2, timeout=20)[-1]
    assert "16:00" in reminder["body"]
    return response


def test_a_conversation_with_a_button_and_stop_through_real_processes(stack):
    """A backend-started appointment answered with a button, then STOP: all across processes."""
    base, simulator = stack["base"], stack["simulator"]
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    phone = "+15551239999"
    response = start_appointment(stack, phone)
    simulator.send_inbound(phone, "", extra={"ButtonPayload": "RESCHEDULE", "ButtonText": "Reschedule"})
    simulator.wait_for_messages(3, timeout=20)
    simulator.send_inbound(phone, "Monday morning please")
    conversation_url = f"{base}/conversations/{response.json()['id']}"
    done = wait_until(lambda: (lambda c: c if c["status"] == "completed" else None)(
        requests.get(conversation_url, headers=auth, timeout=5).json()), what="the appointment outcome")
    assert done["outcome"]["answer"] == "reschedule"
    assert done["outcome"]["requested_time"] == "Monday morning please"

    count = len(simulator.wait_for_messages(4, timeout=20))
    simulator.send_inbound(phone, "Stop")
    confirmation = simulator.wait_for_messages(count + 1, timeout=20)[-1]
    assert "unsubscribed" in confirmation["body"].lower()
    assert requests.post(base + "/notify", json={"to": phone, "body": "hi"}, headers=auth,
                         timeout=5).status_code == 409


def test_a_timeout_is_not_lost_when_the_worker_restarts(stack, app):
    """Timeouts are rows in the database, not timers in a process: a new worker runs them."""
    from bot.clock import utcnow
    from bot.models import Conversation, Message, PeriodicRun

    base, simulator = stack["base"], stack["simulator"]
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    phone = "+15551238888"
    response = start_appointment(stack, phone)
    conversation_url = f"{base}/conversations/{response.json()['id']}"
    # Twilio has the reminder; let the worker record that (a restart *during* a send is another
    # matter: the send's lease, not this test's).
    def reminder_recorded() -> bool:
        with app.app_context():
            db.session.remove()
            return not db.session.scalar(sa.select(sa.func.count()).select_from(Message).where(
                Message.status.in_(("pending", "dispatching"))))

    wait_until(reminder_recorded, timeout=20, what="the reminder's send to be recorded")

    stack["stop_worker"]()  # a deploy restarts the worker while the reminder waits for an answer
    with app.app_context():
        db.session.remove()
        # A day passes with the worker down (no answer), and with it the periodic jobs' last turns.
        db.session.execute(sa.update(Conversation).values(expires_at=utcnow()))
        db.session.execute(sa.delete(PeriodicRun))
        db.session.commit()
        assert requests.get(conversation_url, headers=auth, timeout=5).json()["status"] == "active"
    stack["start_worker"]()

    expired = wait_until(lambda: (lambda c: c if c["status"] == "expired" else None)(
        requests.get(conversation_url, headers=auth, timeout=5).json()), timeout=30,
        what="the new worker to run the timeout")
    assert expired["outcome"]["answer"] == "no_response"
    nudge = simulator.wait_for_messages(3, timeout=20)[-1]
    assert nudge["to"] == "whatsapp:" + phone and "16:00" in nudge["body"]


FROZEN = re.compile(r"(\d+) objects left out of the garbage collector's scans")


def test_each_server_process_sets_what_it_loaded_aside_from_the_garbage_collector(stack):
    """bot/heap.py: the worker once it consumes, each of gunicorn's workers once its app is loaded
    (the Procfile's lines as they are: nothing of the test's own tells them to)."""
    worker = wait_until(lambda: FROZEN.findall(stack["worker_log"]()), timeout=60,
                        what="the worker to freeze what it loaded")
    web = wait_until(lambda: len(FROZEN.findall(stack["web_log"]())) >= 2 and FROZEN.findall(stack["web_log"]()),
                     timeout=60, what="both gunicorn workers (WEB_CONCURRENCY=2) to freeze theirs")
    # Once per process, and what a started process holds: modules, classes, mappers, the SDKs.
    assert len(worker) == 1 and len(web) == 2
    assert min(int(count) for count in worker + web) > 20_000
