"""CPU of the worker per send and per conversation turn, counted per thread (issue 17).

The worker's code runs in this process: huey's own consumer (the Procfile's `--workers 8
--worker-type thread`) on Redis, against PostgreSQL, with the Twilio simulator in a process of
its own (150 ms per create, no status callbacks) so its CPU is not counted. Every thread the
consumer starts (huey's workers, the send pool) runs under its own cProfile whose clock is
`time.thread_time`: the CPU of that thread alone, so time spent waiting (for Twilio, for a rate
slot, for the database) costs nothing in the profile, as it costs nothing on the machine.
Wall-clock samples (py-spy's, in a container) count those waits as work.

    .venv/bin/python bench/worker_cpu.py send --limit 80 -n 800
    .venv/bin/python bench/worker_cpu.py turns -n 400 --profile /tmp/prof
    .venv/bin/python bench/worker_cpu.py broadcast --limit 80 -n 1500   # a broadcast's sends, at its share
    .venv/bin/python bench/worker_cpu.py turns -n 600 --engine-only   # the turn's task alone
    PYTHONPATH=/tmp/base .venv/bin/python bench/worker_cpu.py send ...   # another tree's code

Prints one JSON line: operations, CPU ms per operation (all worker threads; the main thread,
which only seeds and waits, is left out), statements per operation, wall time; with
`--profile DIR`, DIR/<mode>.prof (pstats) and DIR/<mode>.txt (the top functions).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import os
import pstats
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ACCOUNT_SID = "AC" + "c4" * 16
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
SENDER = "whatsapp:+14155238886"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_simulator(latency_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "bot.devtools.simulator", "--port", str(port), "--latency-ms", str(latency_ms),
         "--no-auto-callbacks", "--webhook-url", "http://127.0.0.1:9/twilio/webhook"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return process, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the simulator did not start")


class ThreadProfiles:
    """A cProfile on `time.thread_time` for every thread started from now on (threading.setprofile)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "ThreadProfiles":
        if self.enabled:
            threading.setprofile(self._start)
        return self

    def _start(self, frame, event, arg) -> None:  # noqa: ANN001 - sys.setprofile's signature
        profile = cProfile.Profile(time.thread_time)
        with self._lock:
            self.profiles.append(profile)
        profile.enable()  # replaces this hook in this thread

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)

    def write(self, out: Path, name: str, operations: int) -> None:
        if not self.profiles:
            return
        out.mkdir(parents=True, exist_ok=True)
        stats = None
        for profile in self.profiles:
            profile.create_stats()
            if not profile.stats:
                continue
            stats = pstats.Stats(profile) if stats is None else stats.add(profile)
        if stats is None:
            return
        stats.dump_stats(out / f"{name}.prof")
        with open(out / f"{name}.txt", "w") as f:
            f.write(f"# {operations} operations; times are thread CPU seconds (cProfile inflates them)\n")
            stats.stream = f
            stats.sort_stats("cumulative").print_stats(70)
            stats.sort_stats("tottime").print_stats(40)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("send", "turns", "broadcast"))
    parser.add_argument("-n", type=int, default=800, help="messages in the backlog, turns, or a broadcast's recipients")
    parser.add_argument("--limit", type=int, default=1000, help="TWILIO_MESSAGES_PER_SECOND")
    parser.add_argument("--latency-ms", type=float, default=150)
    parser.add_argument("--threads", type=int, default=8, help="huey worker threads (the Procfile's 8)")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--profile", default=None, metavar="DIR")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--show-statements", action="store_true", help="print every statement (use a small -n)")
    parser.add_argument("--engine-only", action="store_true",
                        help="turns: run each inbound message's task body (engine.process_inbound) in this thread, "
                             "one after another, and count only its CPU: no huey, no sender; the replies' sends "
                             "go on the queue (their enqueue counted) and are dropped")
    args = parser.parse_args(argv)

    simulator, api_url = start_simulator(args.latency_ms)
    try:
        print(json.dumps(run(args, api_url)), flush=True)
    finally:
        simulator.terminate()
        simulator.wait(10)


def run(args: argparse.Namespace, api_url: str) -> dict:
    import sqlalchemy as sa
    from flask_migrate import upgrade

    from bot import create_app
    from bot.clock import utcnow
    from bot.delivery import outbox
    from bot.delivery.queue import huey
    from bot.extensions import db
    from bot.models import Contact, Message
    from bot.vocabulary import Direction, Kind, MessageStatus

    queue = "wcpu-" + uuid.uuid4().hex[:8]
    config = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_WHATSAPP_NUMBER": SENDER,
              "TWILIO_WEBHOOK_URL": "http://127.0.0.1:9/twilio/webhook", "TWILIO_API_URL": api_url,
              "NOTIFY_API_TOKEN": "bench", "DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url,
              "QUEUE_NAME": queue, "TWILIO_MESSAGES_PER_SECOND": args.limit, "WORKER_THREADS": args.threads,
              "SECRET_KEY": "bench", "TWILIO_CONTENT_SIDS": json.dumps({"order_update": "HX" + "b1" * 16}),
              # No broadcast here, and its settings reach this process as config, not as the
              # environment a bulk child would inherit: without this the consumer started one that
              # exited at once and was restarted every few seconds, in both trees' figures.
              "BULK_WORKER_PROCESS": False}
    if args.mode == "turns" and args.engine_only:
        config["HAND_OVER_REPLIES"] = False  # the replies go on the queue: no sender in this process
    logging.basicConfig(level=logging.WARNING)
    with create_app({**config, "TESTING": True}).app_context():  # TESTING: Alembic is loaded
        with db.engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        upgrade()
        db.engine.dispose()
    app = create_app(config)
    n = args.n
    with app.app_context():
        now = utcnow()
        phones = [f"+1561{i:07d}" for i in range(n)]
        db.session.execute(sa.insert(Contact), [
            {"phone": p, "wa_id": p[1:], "user_id": f"b{i}", "name": f"Person {i}", "consent": "opted_in",
             "last_inbound_at": now, "created_at": now, "updated_at": now} for i, p in enumerate(phones)])
        ids = dict(db.session.execute(sa.select(Contact.phone, Contact.id)).all())
        if args.mode == "broadcast":  # as bench/broadcast.py sends it: a template, a variable per user
            db.session.commit()
            answer = app.test_client().post("/broadcasts", headers={"Authorization": "Bearer bench"}, json={
                "audience": {"user_ids": [f"b{i}" for i in range(n)]}, "template": "order_update",
                "variables": {"1": "$user.name", "2": "late opening"}})
            if answer.status_code != 202:
                raise SystemExit(f"POST /broadcasts answered {answer.status_code}: {answer.get_data(as_text=True)}")
            rows = []
        elif args.mode == "send":
            rows = [Message(direction=Direction.OUTBOUND, kind=Kind.NOTIFICATION, contact_id=ids[p],
                            body=f"Backlog {p}", status=MessageStatus.PENDING, status_rank=0) for p in phones]
            for row in rows:
                db.session.add(row)
                outbox.defer_send(row)
        else:
            rows = [Message(direction=Direction.INBOUND, kind=Kind.INBOUND, contact_id=ids[p], body="feedback",
                            twilio_sid="SM" + uuid.uuid4().hex, status=MessageStatus.RECEIVED, status_rank=0,
                            payload={"Body": "feedback", "From": "whatsapp:" + p, "ProfileName": "Bench"})
                    for p in phones]
            for row in rows:
                db.session.add(row)
                outbox.defer_inbound(row)
        db.session.commit()  # every task is on the queue now
        seeded = [row.id for row in rows]
        db.session.remove()

    statements = {"n": 0}
    if args.mode == "turns" and args.engine_only:
        return run_engine_only(args, app, seeded, statements)
    with app.app_context():
        def count(conn, cursor, statement, *rest) -> None:  # noqa: ANN001
            statements["n"] += 1
            if args.show_statements and not statement.startswith("SELECT count(*) FROM messages WHERE direction"):
                print(f"[{threading.current_thread().name}] {' '.join(statement.split())[:160]}", file=sys.stderr)

        sa.event.listen(db.engine, "before_cursor_execute", count)
    done_query = sa.text("SELECT count(*) FROM messages WHERE direction = 'outbound' AND twilio_sid IS NOT NULL")
    consumer = huey.create_consumer(workers=args.threads, worker_type="thread", periodic=False,
                                    initial_delay=0.1, backoff=1.15, max_delay=10.0)
    polls = 0
    main_cpu0, cpu0, wall0 = time.thread_time(), time.process_time(), time.monotonic()
    with ThreadProfiles(bool(args.profile)) as profiles:
        consumer.start()
        try:
            with app.app_context():
                while True:
                    polls += 1
                    done = db.session.scalar(done_query)
                    db.session.commit()
                    if done >= n or time.monotonic() - wall0 > args.timeout:
                        break
                    time.sleep(0.25)
            wall = time.monotonic() - wall0
            cpu = (time.process_time() - cpu0) - (time.thread_time() - main_cpu0)
        finally:
            consumer.stop(graceful=True)
    if args.profile:
        profiles.write(Path(args.profile), args.mode, n)
    steady = None
    if args.mode == "broadcast":  # its pace once going: the middle half of its sends' start times
        with app.app_context():
            started = sorted(db.session.scalars(sa.text(
                "SELECT attempt_started_at FROM messages WHERE kind = 'broadcast' AND attempt_started_at IS NOT NULL")))
            db.session.commit()
        if len(started) >= 8:
            low, high = len(started) // 4, 3 * len(started) // 4
            steady = round((high - low) / max((started[high] - started[low]).total_seconds(), 1e-9), 1)
    with app.app_context():
        queued = huey.pending_count()
        huey.flush()
        db.engine.dispose()
    return {"mode": args.mode, "limit": args.limit, "operations": n, "done": done, "wall_s": round(wall, 2),
            "per_second": round(done / wall, 1), **({"steady_per_second": steady} if steady else {}),
            "worker_cpu_ms_per_op": round(1000 * cpu / max(done, 1), 2),
            "statements_per_op": round((statements["n"] - polls) / max(done, 1), 2), "left_on_queue": queued,
            "profiled": bool(args.profile), "tree": str(Path(sys.modules["bot"].__file__).parents[1])}


def run_engine_only(args: argparse.Namespace, app, message_ids: list[str], statements: dict) -> dict:  # noqa: ANN001
    """The turn's task alone: `engine.process_inbound` for each message, in this thread, each in
    an app context of its own as huey's task runs it (`tasks.in_app_context`); CPU from this
    thread's clock, so nothing else in the process counts."""
    import sqlalchemy as sa

    from bot.conversations import engine
    from bot.delivery.queue import huey
    from bot.extensions import db

    with app.app_context():
        huey.flush()  # the seeding's process_inbound tasks: run here instead
        def count(conn, cursor, statement, *rest) -> None:  # noqa: ANN001
            if threading.current_thread() is not threading.main_thread():
                return
            statements["n"] += 1
            if args.show_statements:
                print(f"{' '.join(statement.split())[:160]}", file=sys.stderr)

        sa.event.listen(db.engine, "before_cursor_execute", count)
    profile = cProfile.Profile(time.thread_time) if args.profile else None
    cpu0, wall0 = time.thread_time(), time.monotonic()
    if profile:
        profile.enable()
    for message_id in message_ids:
        with app.app_context():
            engine.process_inbound(message_id)
    if profile:
        profile.disable()
    cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
    n = len(message_ids)
    if profile:
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(out / "turns-engine.prof")
        with open(out / "turns-engine.txt", "w") as f:
            f.write(f"# {n} turns; times are thread CPU seconds (cProfile inflates them)\n")
            pstats.Stats(profile, stream=f).sort_stats("cumulative").print_stats(70)
    with app.app_context():
        done = db.session.scalar(sa.text("SELECT count(*) FROM messages WHERE direction = 'inbound' "
                                         "AND status = 'processed'"))
        db.session.commit()
        huey.flush()
        db.engine.dispose()
    return {"mode": "turns (engine only)", "operations": n, "done": done, "wall_s": round(wall, 2),
            "turn_cpu_ms": round(1000 * cpu / max(done, 1), 3), "statements_per_turn": round((statements["n"] - 1) / n, 2),
            "profiled": bool(args.profile), "tree": str(Path(sys.modules["bot"].__file__).parents[1])}


if __name__ == "__main__":
    main()
