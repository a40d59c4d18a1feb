"""Benchmark: throughput and latency of the real deployment shape under open-loop load.

One command, PostgreSQL and Redis local::

    .venv/bin/python bench/throughput.py --latency-ms 150 --rates 80,200 --duration 10

What it does, in order:

1. drops and recreates the benchmark database (default ``bench`` on the local PostgreSQL) and uses a
   fresh Huey queue name on Redis db 5 (its keys are deleted at the end);
2. starts the bundled Twilio simulator in this process with ``--latency-ms`` of API latency and
   automatic signed status callbacks (sent, delivered, read) to the web's webhook (with
   ``--simulator-process``, for ``--only turns,notify``: in a process of its own, its CPU counted
   apart from the load generator's: bench/sim_process.py);
3. runs the Procfile's ``release`` line, then its ``web`` and ``worker`` lines verbatim
   (``bash -c``, PORT etc. in the environment, their defaults otherwise);
4. offers load open-loop, at each fixed rate for ``--duration`` seconds: requests leave on a
   schedule whatever the server answers, and latency is counted from the scheduled time, so a
   slow server cannot slow the load down and hide its own queueing (no coordinated omission):

   * ``notify``: POST /notify to distinct contacts inside their 24-hour window;
   * ``turns``: signed inbound "feedback" from distinct opted-in contacts; each one's reply (the
     first question of the feedback flow) is matched at the simulator;
   * status callbacks arrive on their own, three per send, posted by the simulator;

5. baselines on the same gunicorn command line (bench/bare_app.py): a signature-check-only webhook
   (the framework's ceiling) and the naive design that calls Twilio inside the request;
6. peak RSS of every web and worker process (sampled from /proc every 0.5 s);
7. SQL statements per /notify, per inbound, per status callback, per send and per turn, counted
   with a SQLAlchemy ``before_cursor_execute`` listener in this process (create_app with the
   benchmark's settings, the queue drained here by hand);
8. py-spy profiles of the worker (and web) during the fastest /notify run;
9. ``email``: the simulator's SendGrid side answering mail/send in ``--latency-ms`` too; a backlog
   of ``--email-backlog`` emails drained on its own (sends/s, worker CPU per send from /proc),
   beside a WhatsApp backlog drained alone, and the same WhatsApp backlog drained with the email
   backlog queued ahead of it (email must not slow WhatsApp: the ratio of the two drains).

Writes bench/results.json and bench/THROUGHPUT.md. Everything it starts is stopped at the end,
also on Ctrl-C or an error. This is a benchmark, not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.devmode import dev_api_key, dev_private_key  # noqa: E402
from bot.devtools.sendgrid_simulator import public_key_text  # noqa: E402
from bot.devtools.simulator import TwilioSimulator, sign  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_process import SimulatorProcess  # noqa: E402

ACCOUNT_SID = "AC" + "be" * 16
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
API_TOKEN = "bench-api-token"
SENDER = "whatsapp:+14155238886"
#: The simulator's pause between one send's status callbacks (Twilio's are seconds apart; shorter
#: keeps the run short while still putting three callbacks per send on the webhook).
CALLBACK_DELAY = 0.5
#: Twilio gives a webhook 15 s; a request slower than that is a failure, as Twilio would count it.
CLIENT_TIMEOUT = 15.0
#: The email sender and the secret of the unsubscribe links, for the email scenario.
EMAIL_FROM = "Bench <bench@example.test>"
SECRET_KEY = "bench-secret-key-for-unsubscribe-links"
CONTACTS_PER_RUN_PREFIX = {"notify": "+1555", "turns": "+1556", "queries": "+1557", "backlog": "+1558",
                           "two": "+1554", "two-turns": "+1550", "limited": "+1553", "profiled": "+1549", "history-backlog": "+1552", "history-turns": "+1551",
                           "email-wa-alone": "+1548", "email-wa-mixed": "+1547",
                           "worker-backlog": "+1546", "worker-limited": "+1545", "worker-turns": "+1544"}


# ----------------------------------------------------------------------------- small helpers


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The source tree whose Procfile and code run (`--baseline-tree` switches it for the "before" run).
TREE = ROOT


def procfile() -> dict[str, str]:
    """The Procfile's process types and their command lines (of the tree under test)."""
    lines = (TREE / "Procfile").read_text().splitlines()
    return {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in lines if l.strip() and not l.startswith("#"))}


def pct(samples: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..1) of ``samples``, or None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def summary(samples: list[float]) -> dict[str, float | int | None]:
    """count, p50, p99 and max of latencies given in seconds, reported in milliseconds."""
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"count": len(samples), "p50_ms": ms(pct(samples, 0.50)), "p99_ms": ms(pct(samples, 0.99)),
            "max_ms": ms(max(samples) if samples else None)}


def phone(kind: str, rate: int, i: int) -> str:
    """A distinct fictitious E.164 number per scenario, rate and request (+1 555/556/557 ...)."""
    return f"{CONTACTS_PER_RUN_PREFIX[kind]}{rate % 100:02d}{i:05d}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def with_db(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


# ----------------------------------------------------------------------------- processes


class Processes:
    """Starts command lines in their own process groups and stops every one of them, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, subprocess.Popen] = {}
        self._logs: list[Any] = []

    def start(self, name: str, command: str, env: dict[str, str]) -> subprocess.Popen:
        log_file = open(self.workdir / f"{name}.log", "w")
        self._logs.append(log_file)
        # exec, so the Popen pid is the server itself (gunicorn's master, huey_consumer), as on a host.
        process = subprocess.Popen(["bash", "-c", "exec " + command], env=env, cwd=self.workdir,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = process
        return process

    def stop(self, name: str) -> None:
        process = self.started.pop(name, None)
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)
        for log_file in self._logs:
            log_file.close()


def wait_healthy(url: str, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers (any status below 500)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Every 0.5 s, the resident memory of each watched process tree; keeps each process's peak."""

    def __init__(self) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.roots: dict[str, int] = {}
        self.peaks: dict[str, dict[int, int]] = collections.defaultdict(dict)  # label -> pid -> KiB
        self.tree_peak: dict[str, int] = collections.defaultdict(int)
        self._stop = threading.Event()

    def watch(self, label: str, pid: int) -> None:
        self.roots[label] = pid

    def run(self) -> None:
        while not self._stop.wait(0.5):
            for label, root in list(self.roots.items()):
                total = 0
                for pid in process_tree(root):
                    kib = rss_kib(pid)
                    if kib is None:
                        continue
                    total += kib
                    self.peaks[label][pid] = max(kib, self.peaks[label].get(pid, 0))
                self.tree_peak[label] = max(total, self.tree_peak[label])

    def stop(self) -> None:
        self._stop.set()

    def report(self) -> dict[str, Any]:
        out = {}
        for label, root in self.roots.items():
            per_pid = self.peaks.get(label, {})
            out[label] = {
                "root_pid": root,
                "peak_rss_mib_by_process": {("master" if pid == root else f"pid {pid}"): round(kib / 1024, 1)
                                            for pid, kib in sorted(per_pid.items())},
                "peak_rss_mib_tree": round(self.tree_peak.get(label, 0) / 1024, 1),
            }
        return out


# ----------------------------------------------------------------------------- open-loop load


@dataclass
class Sample:
    """One request of an open-loop run; times are time.time() seconds."""

    index: int
    scheduled: float
    started: float = 0.0
    done: float = 0.0
    status: int | None = None
    error: str | None = None
    key: str = ""  # what the simulator sees of this request (the recipient), for end-to-end matching

    @property
    def latency(self) -> float:
        return self.done - self.scheduled


RequestFactory = Callable[[int], tuple[str, dict[str, Any], str]]  # i -> (url, aiohttp kwargs, key)


async def _open_loop(rate: float, duration: float, make: RequestFactory) -> list[Sample]:
    count = max(1, int(rate * duration))
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    # No connection limit: an open-loop client opens what the schedule needs, as Twilio's fleet would.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def fire(sample: Sample, url: str, kwargs: dict[str, Any]) -> None:
            sample.started = time.time()
            try:
                async with session.post(url, **kwargs) as response:
                    await response.read()
                    sample.status = response.status
            except Exception as exc:  # timeouts and refused connections are results, not crashes
                sample.error = type(exc).__name__
            sample.done = time.time()

        tasks = []
        t0 = time.time() + 0.1
        for i in range(count):
            scheduled = t0 + i / rate
            delay = scheduled - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            url, kwargs, key = make(i)
            sample = Sample(index=i, scheduled=scheduled, key=key)
            samples.append(sample)
            tasks.append(asyncio.create_task(fire(sample, url, kwargs)))
        await asyncio.gather(*tasks)
    return samples


def open_loop(rate: float, duration: float, make: RequestFactory) -> list[Sample]:
    """Offer ``rate`` requests per second for ``duration`` seconds, each on its schedule."""
    return asyncio.run(_open_loop(rate, duration, make))


def load_stats(samples: list[Sample], rate: float, duration: float, ok_status: int) -> dict[str, Any]:
    """Offered vs achieved rate, answer throughput and latency percentiles of one open-loop run."""
    ok = [s for s in samples if s.status == ok_status]
    starts = [s.started for s in samples]
    first = min(s.scheduled for s in samples)
    last_done = max(s.done for s in samples)
    codes = collections.Counter(str(s.status) if s.status is not None else s.error for s in samples)
    lag = [s.started - s.scheduled for s in samples]
    return {
        "offered_rate": rate,
        "requests": len(samples),
        # How closely the client kept its schedule (the load generator shares the 2 cores).
        "achieved_send_rate": round(len(samples) / max(max(starts) - first, 1e-9), 1) if len(samples) > 1 else None,
        "client_lag_p99_ms": round((pct(lag, 0.99) or 0) * 1000, 1),
        "ok": len(ok),
        "answers": dict(codes),
        "ok_per_second": round(len(ok) / max(last_done - first, 1e-9), 1),
        "latency": summary([s.latency for s in ok]),
    }


def first_creates(timings: list[dict[str, Any]]) -> dict[str, float]:
    """Each recipient's first create at the simulator: when it arrived (its own clock)."""
    first: dict[str, float] = {}
    for t in timings:
        first.setdefault(t["to"], t["received_at"])
    return first


def end_to_end(samples: list[Sample], timings: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Match each request to the first create for its recipient at the simulator.

    Returns the request -> handed-to-Twilio latency, how many arrived, the sustained rate at which
    they left (messages / time from the first scheduled request to the last create), and how long
    after the load stopped the last one left (the backlog the load built up).
    """
    first_create = first_creates(timings)
    matched = [(s, first_create[s.key]) for s in samples if s.key in first_create]
    start = min(s.scheduled for s in samples)
    end_of_load = start + duration
    if not matched:
        return {"delivered": 0, "expected": len(samples)}
    last = max(at for _, at in matched)
    return {
        "expected": len(samples),
        "delivered": len(matched),
        "messages_per_second": round(len(matched) / max(last - start, 1e-9), 1),
        "last_left_after_load_s": round(last - end_of_load, 1),
        "latency": summary([at - s.scheduled for s, at in matched]),
    }


def wait_for_creates(sim: TwilioSimulator, recipients: set[str], timeout: float) -> bool:
    """Block until every recipient got a create at the simulator (True), or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {t["to"] for t in sim.timings}
        if recipients <= seen:
            return True
        time.sleep(0.5)
    log(f"  gave up waiting: {len(recipients - {t['to'] for t in sim.timings})} message(s) had not reached "
        f"Twilio {timeout:.0f} s after the load; the next scenario starts with that backlog")
    return False


def callback_stats(sim: TwilioSimulator) -> dict[str, Any]:
    """The status callbacks the simulator posted (to the web's webhook) during one scenario."""
    hooks = [w for w in sim.webhooks if w["kind"] == "status"]
    if not hooks:
        return {"count": 0}
    span = max(w["posted_at"] + (w["duration"] or 0) for w in hooks) - min(w["posted_at"] for w in hooks)
    codes = collections.Counter(str(w["status_code"]) if w["status_code"] is not None else "error" for w in hooks)
    return {
        "count": len(hooks),
        "per_second": round(len(hooks) / max(span, 1e-9), 1),
        "answers": dict(codes),
        "per_message": round(len(hooks) / max(len(sim.timings), 1), 2),
        "latency": summary([w["duration"] for w in hooks if w["status_code"] == 200]),
    }


# ----------------------------------------------------------------------------- requests


def signed_form(url: str, form: dict[str, str]) -> dict[str, Any]:
    """aiohttp kwargs for a form POST signed the way Twilio signs its webhooks."""
    return {"data": form, "headers": {"X-Twilio-Signature": sign(AUTH_TOKEN, url, form),
                                      "User-Agent": "TwilioProxy/1.1"}}


def inbound_form(from_: str, body: str) -> dict[str, str]:
    sid = "SM" + uuid.uuid4().hex
    return {"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": ACCOUNT_SID,
            "From": "whatsapp:" + from_, "To": SENDER, "Body": body, "NumMedia": "0", "NumSegments": "1",
            "SmsStatus": "received", "ApiVersion": "2010-04-01", "WaId": from_.lstrip("+"),
            "ProfileName": "Bench", "MessageType": "text"}


def seed_contacts(database_url: str, phones: list[str]) -> None:
    """Opted-in contacts who wrote a minute ago (inside WhatsApp's 24-hour window), in one insert."""
    import sqlalchemy as sa

    from bot.clock import utcnow
    from bot.config import database_uri
    from bot.models import Contact

    engine = sa.create_engine(database_uri(database_url, "."))
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.insert(Contact.__table__), [
            {"phone": p, "wa_id": p.lstrip("+"), "consent": "opted_in", "last_inbound_at": now - dt.timedelta(minutes=1),
             "created_at": now, "updated_at": now} for p in phones])
    engine.dispose()


def _proc_cpu(pid: int, ticks: float) -> tuple[str, float] | None:
    with contextlib.suppress(OSError, IndexError, ValueError):
        text = Path(f"/proc/{pid}/stat").read_text()
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        return comm, (int(fields[11]) + int(fields[12])) / ticks
    return None


def cpu_snapshot(stack: "Stack") -> dict[str, float]:
    """CPU seconds used so far by each part of the run: web, worker(s), this process (load
    generator and simulator), PostgreSQL, Redis, and the whole machine (from /proc/stat)."""
    import resource

    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = collections.defaultdict(float)
    ours: set[int] = set()
    for name, process in stack.processes.started.items():
        part = "worker" if name.startswith("worker") else name
        for pid in process_tree(process.pid):
            ours.add(pid)
            got = _proc_cpu(pid, ticks)
            if got:
                out[part] += got[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in ours:
            got = _proc_cpu(int(entry), ticks)
            if got and got[0].startswith(("postgres", "redis-server")):
                out["postgresql" if got[0].startswith("postgres") else "redis"] += got[1]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    sim_pid = getattr(stack.sim, "pid", None)
    if sim_pid:  # --simulator-process: the generator and the simulator apart
        out["load generator"] = usage.ru_utime + usage.ru_stime
        got = _proc_cpu(sim_pid, ticks)
        out["simulator"] = got[1] if got else 0.0
    else:
        out["load generator + simulator"] = usage.ru_utime + usage.ru_stime
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    out["machine"] = (user + nice + system + irq + softirq) / ticks  # what ran here
    out["steal"] = steal / ticks  # a virtual machine's CPU that its host gave to others
    return dict(out)


def machine_busy_cores(interval: float = 1.0) -> float:
    """Cores the whole machine kept busy over the next `interval` seconds."""
    def busy() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = list(map(int, f.readline().split()[1:]))
        return sum(fields) - fields[3] - fields[4], time.monotonic()
    (b0, t0) = busy()
    time.sleep(interval)
    (b1, t1) = busy()
    return (b1 - b0) / os.sysconf("SC_CLK_TCK") / (t1 - t0)


#: How long a scenario waits for the machine to be quiet before it starts anyway (--quiet-timeout).
QUIET_TIMEOUT = 120.0


def wait_for_quiet(threshold: float = 0.3, timeout: float | None = None) -> float:
    """Wait until the machine is nearly idle (what the last scenario left behind has drained: late
    callbacks, a backlog, autovacuum), so one scenario's figures are not the previous one's."""
    deadline = time.monotonic() + (QUIET_TIMEOUT if timeout is None else timeout)
    while True:
        busy = machine_busy_cores()
        if busy < threshold or time.monotonic() > deadline:
            return round(busy, 2)


def cpu_split(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores each part used on average between two snapshots."""
    return {k: round((after.get(k, 0) - before.get(k, 0)) / max(seconds, 1e-9), 2) for k in after}


def seed_backlog(config: dict[str, Any], phones: list[str], body: str) -> list[str]:
    """Pending outbound messages, one per phone, and their send tasks on the worker's queue:
    what a burst of /notify leaves behind, without the web in the way."""
    import logging

    import sqlalchemy as sa

    from bot import create_app
    from bot.delivery import outbox
    from bot.extensions import db
    from bot.models import Contact, Message
    from bot.vocabulary import Direction, Kind, MessageStatus

    logging.disable(logging.INFO)
    app = create_app(dict(config))
    ids: list[str] = []
    with app.app_context():
        contacts = db.session.execute(sa.select(Contact.id, Contact.phone).where(Contact.phone.in_(phones))).all()
        for contact_id, phone_number in contacts:
            message = Message(direction=Direction.OUTBOUND, kind=Kind.NOTIFICATION, contact_id=contact_id,
                              body=f"{body} {phone_number}", status=MessageStatus.PENDING,
                              status_rank=MessageStatus.PENDING.rank)
            db.session.add(message)
            outbox.defer_send(message)
            ids.append(message.id)
        db.session.commit()  # the outbox enqueues every send task now
        db.session.remove()
        db.engine.dispose()
    logging.disable(logging.NOTSET)
    return ids


# ----------------------------------------------------------------------------- profiling


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def start_profiles(pids: dict[str, int], seconds: int, out_dir: Path) -> list[tuple[str, subprocess.Popen, Path]]:
    """py-spy, non-blocking (it never pauses the process): an SVG flame graph of on-CPU stacks, and
    raw collapsed stacks with idle threads included (to see where wall time goes: waiting on Twilio)."""
    exe = py_spy()
    if exe is None:
        return []
    started = []
    for label, pid in pids.items():
        for fmt, idle, out in (("flamegraph", False, out_dir / f"profile-{label}.svg"),
                               ("raw", True, out_dir / f"profile-{label}-wall.txt"),
                               ("raw", False, out_dir / f"profile-{label}-cpu.txt")):
            cmd = [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "25",
                   "--nonblocking", "--format", fmt, "-o", str(out)]
            if label == "web":
                cmd.append("--subprocesses")
            if idle:
                cmd.append("--idle")
            started.append((f"{label}:{fmt}:{'wall' if idle else 'cpu'}",
                            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                             start_new_session=True), out))
    return started


def top_frames(collapsed: Path, limit: int = 12) -> dict[str, Any]:
    """Top frames of py-spy's raw (collapsed) output: by self samples and by inclusive samples."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_counts[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = lambda n: round(100 * n / max(total, 1), 1)  # noqa: E731
    return {"samples": total,
            "self": [[f, share(n)] for f, n in self_counts.most_common(limit)],
            "inclusive": [[f, share(n)] for f, n in inclusive.most_common(limit)]}


# ----------------------------------------------------------------------------- queries per operation


def count_queries(config: dict[str, Any], base: str, sim: TwilioSimulator, n: int, run: int = 0) -> dict[str, Any]:
    """SQL statements per operation, counted in this process with a before_cursor_execute listener.

    create_app with the benchmark's settings but its own queue name; requests go through Flask's
    test client (the same view code gunicorn runs), tasks are dequeued and executed here one by
    one (what huey_consumer does), so every statement is attributed to exactly one operation.
    """
    import logging

    import sqlalchemy as sa

    from bot import create_app
    from bot.delivery.queue import huey
    from bot.extensions import db

    # The status callbacks are posted below through the test client, so they are counted here;
    # the simulator's own would go to the gunicorn web process instead.
    sim.auto_callbacks = False
    logging.disable(logging.INFO)  # the app's per-send log lines would flood the benchmark's output
    app = create_app({**config, "QUEUE_NAME": config["QUEUE_NAME"] + "-queries",
                      "HUEY_STORAGE_OPTIONS": {"blocking": False}})
    counter = {"n": 0}
    client = app.test_client()
    webhook = base + "/twilio/webhook"
    notify_phones = [phone("queries", 2 * run + 1, i) for i in range(n)]  # `run`: a second count, new contacts
    turn_phones = [phone("queries", 2 * run + 2, i) for i in range(n)]
    seed_contacts(config["DATABASE_URL"], notify_phones + turn_phones)

    def drain() -> dict[str, list[int]]:
        """Run queued tasks here until the queue is empty; statements per task, by task name."""
        per_task: dict[str, list[int]] = collections.defaultdict(list)
        while (task := huey.dequeue()) is not None:
            before = counter["n"]
            huey.execute(task)
            per_task[task.name].append(counter["n"] - before)
        return per_task

    with app.app_context():
        sa.event.listen(db.engine, "before_cursor_execute", lambda *a: counter.__setitem__("n", counter["n"] + 1))
        sim.reset()
        before = counter["n"]
        for p in notify_phones:
            r = client.post("/notify", json={"to": p, "body": "Your order shipped"},
                            headers={"Authorization": f"Bearer {API_TOKEN}"})
            assert r.status_code == 202, r.get_data(as_text=True)
        notify_q = (counter["n"] - before) / n
        sends = drain()
        sids = [t["sid"] for t in sim.timings]

        before = counter["n"]
        for sid, p in zip(sids, notify_phones):
            for status in ("sent", "delivered", "read"):
                form = {"MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
                        "AccountSid": ACCOUNT_SID, "From": SENDER, "To": "whatsapp:" + p,
                        "ApiVersion": "2010-04-01", "ChannelPrefix": "whatsapp"}
                r = client.post("/twilio/webhook", data=form, base_url=base,
                                headers={"X-Twilio-Signature": sign(AUTH_TOKEN, webhook, form)})
                assert r.status_code == 200, r.get_data(as_text=True)
        status_q = (counter["n"] - before) / (3 * len(sids))

        before = counter["n"]
        for p in turn_phones:
            form = inbound_form(p, "feedback")
            r = client.post("/twilio/webhook", data=form, base_url=base,
                            headers={"X-Twilio-Signature": sign(AUTH_TOKEN, webhook, form)})
            assert r.status_code == 200, r.get_data(as_text=True)
        inbound_q = (counter["n"] - before) / n
        turns = drain()
        db.session.remove()
        db.engine.dispose()
    huey.flush()
    turn_total = sum(sum(v) for v in turns.values())
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else None  # noqa: E731
    return {
        "operations": n,
        "web_per_notify_request": round(notify_q, 1),
        "web_per_inbound_webhook": round(inbound_q, 1),
        "web_per_status_callback": round(status_q, 1),
        "worker_per_send": mean(sends.get(next((k for k in sends if k.endswith("send_message")), ""), [])),
        "worker_per_turn": round(turn_total / n, 1),
        "worker_per_turn_by_task": {k.rsplit(".", 1)[-1]: {"tasks": len(v), "per_task": mean(v)} for k, v in turns.items()},
        "how": "SQLAlchemy before_cursor_execute listener on the app's engine, in the benchmark process "
               "(create_app with the benchmark's settings); web counts via Flask's test client, worker "
               "counts by executing each dequeued task here; divided by the number of operations.",
    }


# ----------------------------------------------------------------------------- the run


@dataclass
class Stack:
    """The running system under test and where to reach it."""

    base: str
    webhook: str
    config: dict[str, Any]
    env: dict[str, str]
    sim: TwilioSimulator
    processes: Processes
    rss: RssSampler
    results: dict[str, Any] = field(default_factory=dict)


def run_notify(stack: Stack, rate: int, duration: float, drain_timeout: float, profile: bool,
               out_dir: Path) -> dict[str, Any]:
    quiet = wait_for_quiet()
    phones = [phone("notify", rate, i) for i in range(int(rate * duration))]
    seed_contacts(stack.config["DATABASE_URL"], phones)
    stack.sim.reset()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}

    def make(i: int) -> tuple[str, dict[str, Any], str]:
        return (stack.base + "/notify",
                {"json": {"to": phones[i], "body": f"Your order {i} shipped"}, "headers": auth},
                "whatsapp:" + phones[i])

    profiles = []
    if profile:
        pids = {"worker": stack.processes.started["worker"].pid, "web": stack.processes.started["web"].pid}
        profiles = start_profiles(pids, int(duration) + 10, out_dir)
    cpu_before, started = cpu_snapshot(stack), time.monotonic()
    samples = open_loop(rate, duration, make)
    cpu_load = cpu_split(cpu_before, cpu_snapshot(stack), time.monotonic() - started)
    drained = wait_for_creates(stack.sim, {s.key for s in samples if s.status == 202}, drain_timeout)
    time.sleep(CALLBACK_DELAY * 3 + 1)  # the last sends' callbacks
    result = {"busy_cores_before": quiet, "cores_during_load": cpu_load,
              "acceptance": load_stats(samples, rate, duration, 202),
              "handed_to_twilio": {**end_to_end(samples, stack.sim.timings, duration), "drained": drained},
              "status_callbacks": callback_stats(stack.sim)}
    for label, process, out in profiles:
        _, err = process.communicate(timeout=120)
        if process.returncode != 0:
            result.setdefault("profile_errors", {})[label] = err.decode(errors="replace")[-500:]
        elif out.suffix == ".txt" and out.exists():
            result.setdefault("profile", {})[label] = top_frames(out)
    return result


def worker_pids(stack: Stack) -> list[int]:
    return [p.pid for name, p in stack.processes.started.items() if name.startswith("worker")]


def run_backlog(stack: Stack, size: int, drain_timeout: float, profile: bool, out_dir: Path,
                label: str = "backlog") -> dict[str, Any]:
    """The send path on its own: `size` messages already pending, how fast the worker(s) drain them."""
    quiet = wait_for_quiet()
    phones = [phone(label, size, i) for i in range(size)]
    seed_contacts(stack.config["DATABASE_URL"], phones)
    stack.sim.reset()
    workers = worker_pids(stack)
    profiles = start_profiles({"sender": workers[0]}, 20, out_dir) if profile else []
    callbacks, stack.sim.auto_callbacks = stack.sim.auto_callbacks, False  # the send path on its own
    try:
        before, started = cpu_snapshot(stack), time.time()
        seed_backlog(stack.config, phones, "Backlog")
        drained = wait_for_creates(stack.sim, {"whatsapp:" + p for p in phones}, drain_timeout)
        creates = sorted(t["received_at"] for t in stack.sim.timings)
        after = cpu_snapshot(stack)
        cpu = after["worker"] - before["worker"]  # every "worker…" process, as worker_pids
        split = cpu_split(before, after, time.time() - started)
    finally:
        stack.sim.auto_callbacks = callbacks
    result: dict[str, Any] = {"size": size, "workers": len(workers), "drained": drained,
                              "handed_to_twilio": len(creates), "cores": split, "busy_cores_before": quiet}
    if creates:
        # The steady rate: between the first and the last create (a rate limit shows here).
        steady = (len(creates) - 1) / max(creates[-1] - creates[0], 1e-9)
        # The most creates in any one second: what a per-second limit must hold to.
        busiest, j = 0, 0
        for i, at in enumerate(creates):
            while creates[j] <= at - 1.0:
                j += 1
            busiest = max(busiest, i - j + 1)
        result.update({
            "busiest_second": busiest,
            "messages_per_second": round(len(creates) / max(creates[-1] - started, 1e-9), 1),
            "steady_messages_per_second": round(steady, 1),
            "worker_cpu_s": round(cpu, 2), "worker_cpu_ms_per_send": round(1000 * cpu / len(creates), 2),
            "worker_cpu_share": round(cpu / max(creates[-1] - started, 1e-9), 2),
        })
    for label, process, out in profiles:
        process.communicate(timeout=120)
        if out.suffix == ".txt" and out.exists():
            result.setdefault("profile", {})[label] = top_frames(out)
    return result


def seed_email_backlog(config: dict[str, Any], label: str, size: int) -> list[str]:
    """`size` users known by email only, one pending email each, their send tasks on the queue:
    what a burst of /notify {"user_id", "subject", "body"} leaves behind."""
    import logging

    import sqlalchemy as sa

    from bot import create_app
    from bot.clock import utcnow
    from bot.delivery import outbox
    from bot.extensions import db
    from bot.models import Contact, Message
    from bot.vocabulary import Channel, Direction, Kind, MessageStatus

    logging.disable(logging.INFO)
    app = create_app(dict(config))
    ids: list[str] = []
    with app.app_context():
        now = utcnow()
        db.session.execute(sa.insert(Contact), [
            {"user_id": f"{label}-{i}", "email": f"{label}-{i}@bench.example", "channels": ["email"],
             "created_at": now, "updated_at": now} for i in range(size)])
        contacts = db.session.execute(sa.select(Contact.id, Contact.user_id).where(
            Contact.user_id.like(f"{label}-%"))).all()
        for contact_id, user_id in contacts:
            message = Message(direction=Direction.OUTBOUND, kind=Kind.NOTIFICATION, contact_id=contact_id,
                              channel=Channel.EMAIL, subject="Your receipt", body=f"Backlog email {user_id}",
                              status=MessageStatus.PENDING, status_rank=MessageStatus.PENDING.rank)
            db.session.add(message)
            outbox.defer_send(message)
            ids.append(message.id)
        db.session.commit()  # the outbox enqueues every send task now
        db.session.remove()
        db.engine.dispose()
    logging.disable(logging.NOTSET)
    return ids


def _emails_taken(sim: TwilioSimulator) -> int:
    # A benchmark's peek: `emails` deep-copies every accepted email, too costly to poll at 2 Hz
    # with thousands stored on the cores the worker needs.
    return len(sim.sendgrid._emails)


def _drain_figures(arrivals: list[float], started: float, cpu_s: float) -> dict[str, Any]:
    """sends/s from the first enqueue to the last arrival, the steady rate, worker CPU per send."""
    if not arrivals:
        return {"sent": 0}
    arrivals = sorted(arrivals)
    return {"sent": len(arrivals),
            "sends_per_second": round(len(arrivals) / max(arrivals[-1] - started, 1e-9), 1),
            "steady_sends_per_second": round((len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9), 1),
            "drain_seconds": round(arrivals[-1] - started, 1),
            "worker_cpu_s": round(cpu_s, 2), "worker_cpu_ms_per_send": round(1000 * cpu_s / len(arrivals), 2)}


def run_email(stack: Stack, email_size: int, whatsapp_size: int, drain_timeout: float) -> dict[str, Any]:
    """Email beside WhatsApp, one worker, status callbacks and email events off (the send paths
    on their own): WhatsApp's backlog alone; the email backlog alone; then WhatsApp's backlog
    again with the email backlog queued ahead of it."""
    sendgrid = stack.sim.sendgrid
    events, sendgrid.auto_events = sendgrid.auto_events, False
    callbacks, stack.sim.auto_callbacks = stack.sim.auto_callbacks, False
    out: dict[str, Any] = {"email_backlog": email_size, "whatsapp_backlog": whatsapp_size,
                           "sendgrid_latency_ms": round(sendgrid.latency * 1000)}
    try:
        log(f"email: WhatsApp backlog of {whatsapp_size} alone")
        out["whatsapp_alone"] = run_backlog(stack, whatsapp_size, drain_timeout, False, Path("."),
                                            label="email-wa-alone")

        log(f"email: a backlog of {email_size} emails alone")
        out["busy_cores_before_email"] = wait_for_quiet()
        stack.sim.reset()
        before, started = cpu_snapshot(stack), time.time()
        seed_email_backlog(stack.config, "email-alone", email_size)
        deadline = time.monotonic() + drain_timeout
        while _emails_taken(stack.sim) < email_size and time.monotonic() < deadline:
            time.sleep(0.5)
        after = cpu_snapshot(stack)
        out["email_alone"] = {**_drain_figures([e["received_at"] for e in sendgrid.emails], started,
                                               after["worker"] - before["worker"]),
                              "size": email_size, "cores": cpu_split(before, after, time.time() - started)}

        log(f"email: WhatsApp backlog of {whatsapp_size} with {email_size} emails queued ahead of it")
        out["busy_cores_before_mixed"] = wait_for_quiet()
        phones = [phone("email-wa-mixed", whatsapp_size, i) for i in range(whatsapp_size)]
        seed_contacts(stack.config["DATABASE_URL"], phones)
        stack.sim.reset()
        before, started = cpu_snapshot(stack), time.time()
        seed_email_backlog(stack.config, "email-mixed", email_size)
        whatsapp_started = time.time()
        seed_backlog(stack.config, phones, "Backlog")
        drained = wait_for_creates(stack.sim, {"whatsapp:" + p for p in phones}, drain_timeout)
        whatsapp_done = time.time()
        creates = [t["received_at"] for t in stack.sim.timings]
        deadline = time.monotonic() + drain_timeout
        while _emails_taken(stack.sim) < email_size and time.monotonic() < deadline:
            time.sleep(0.5)
        after = cpu_snapshot(stack)
        emails = [e["received_at"] for e in sendgrid.emails]
        mixed = _drain_figures(creates, whatsapp_started, 0.0)
        mixed.pop("worker_cpu_s"), mixed.pop("worker_cpu_ms_per_send")
        out["whatsapp_with_email_queued"] = {
            **mixed, "size": whatsapp_size, "drained": drained,
            "emails_sent_meanwhile": sum(1 for at in emails if at <= whatsapp_done),
            "emails_sent_in_all": len(emails),
            "email_sends_per_second": _drain_figures(emails, started, 0.0).get("sends_per_second"),
            "worker_cpu_ms_per_send_both": round(1000 * (after["worker"] - before["worker"])
                                                 / max(len(creates) + len(emails), 1), 2),
            "cores": cpu_split(before, after, time.time() - started)}
        alone = out["whatsapp_alone"].get("messages_per_second")
        if alone and mixed.get("sends_per_second"):
            out["whatsapp_ratio_with_email_queued"] = round(mixed["sends_per_second"] / alone, 2)
            # Between WhatsApp's own first and last create: the rate once it is moving.
            out["whatsapp_steady_ratio_with_email_queued"] = round(
                mixed["steady_sends_per_second"] / out["whatsapp_alone"]["steady_messages_per_second"], 2)
    finally:
        sendgrid.auto_events = events
        stack.sim.auto_callbacks = callbacks
    return out


def start_worker(stack: Stack, name: str, **env: str) -> None:
    process = stack.processes.start(name, procfile()["worker"], {**stack.env, **env})
    stack.rss.watch(name, process.pid)
    time.sleep(2)  # its threads start polling


def run_two_workers(stack: Stack, size: int, rate: int, duration: float, drain_timeout: float,
                    limited_rate: int) -> dict[str, Any]:
    """A second `worker` line beside the first: sends and turns again, then the shared rate limit
    with both workers draining one backlog at TWILIO_MESSAGES_PER_SECOND=`limited_rate`."""
    out: dict[str, Any] = {}
    start_worker(stack, "worker-2")
    try:
        out["backlog"] = run_backlog(stack, size, drain_timeout, False, Path("."), label="two")
        out["turns"] = run_turns(stack, rate, duration, drain_timeout, label="two-turns")
    finally:
        stack.processes.stop("worker-2")
    stack.processes.stop("worker")
    start_worker(stack, "worker-limited-1", TWILIO_MESSAGES_PER_SECOND=str(limited_rate))
    start_worker(stack, "worker-limited-2", TWILIO_MESSAGES_PER_SECOND=str(limited_rate))
    try:
        out["rate_limit"] = {"setting": limited_rate, **run_backlog(
            stack, limited_rate * 10, drain_timeout, False, Path("."), label="limited")}
    finally:
        stack.processes.stop("worker-limited-1")
        stack.processes.stop("worker-limited-2")
        start_worker(stack, "worker")
    return out


def seed_history(database_url: str, messages: int) -> dict[str, Any]:
    """`messages` old messages (half inbound, half outbound, delivered or received) over 10,000
    contacts, written by PostgreSQL itself in one statement per table."""
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO contacts (phone, wa_id, consent, last_inbound_at, created_at, updated_at)
            SELECT '+1559' || lpad(g::text, 7, '0'), '1559' || lpad(g::text, 7, '0'), 'opted_in',
                   now() - interval '3 days', now() - interval '30 days', now() - interval '3 days'
            FROM generate_series(1, 10000) g""")
        conn.execute("""
            INSERT INTO messages (id, direction, kind, contact_id, body, twilio_sid, status, status_rank,
                                  attempts, created_at, updated_at, sent_at)
            SELECT md5('history' || g), CASE WHEN g %% 2 = 0 THEN 'outbound' ELSE 'inbound' END,
                   CASE WHEN g %% 2 = 0 THEN 'notification' ELSE 'inbound' END,
                   c.id, 'old message ' || g, 'SM' || md5('history-sid' || g),
                   CASE WHEN g %% 2 = 0 THEN 'delivered' ELSE 'processed' END,
                   CASE WHEN g %% 2 = 0 THEN 6 ELSE 0 END, 1,
                   now() - (g || ' seconds')::interval, now() - (g || ' seconds')::interval,
                   now() - (g || ' seconds')::interval
            FROM generate_series(1, %s) g
            JOIN contacts c ON c.phone = '+1559' || lpad((g %% 10000 + 1)::text, 7, '0')""", (messages,))
        conn.execute("ANALYZE")
        count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    return {"messages_in_database": count, "seed_seconds": round(time.monotonic() - started, 1)}


def run_turns(stack: Stack, rate: int, duration: float, drain_timeout: float, label: str = "turns") -> dict[str, Any]:
    quiet = wait_for_quiet()
    phones = [phone(label, rate, i) for i in range(int(rate * duration))]
    seed_contacts(stack.config["DATABASE_URL"], phones)
    stack.sim.reset()

    def make(i: int) -> tuple[str, dict[str, Any], str]:
        return stack.webhook, signed_form(stack.webhook, inbound_form(phones[i], "feedback")), "whatsapp:" + phones[i]

    cpu_before, started = cpu_snapshot(stack), time.monotonic()
    samples = open_loop(rate, duration, make)
    cpu_load = cpu_split(cpu_before, cpu_snapshot(stack), time.monotonic() - started)
    drained = wait_for_creates(stack.sim, {s.key for s in samples if s.status == 200}, drain_timeout)
    time.sleep(CALLBACK_DELAY * 3 + 1)
    return {"busy_cores_before": quiet, "cores_during_load": cpu_load,
            "inbound_webhook": load_stats(samples, rate, duration, 200),
            "reply_handed_to_twilio": {**end_to_end(samples, stack.sim.timings, duration), "drained": drained},
            "status_callbacks": callback_stats(stack.sim)}


def restart_worker(stack: Stack, **env: str) -> None:
    """The `worker` line again, with `env` on top of the run's environment."""
    stack.processes.stop("worker")
    start_worker(stack, "worker", **env)


def cpu_per_operation(before: dict[str, float], after: dict[str, float], operations: int) -> dict[str, float]:
    """CPU milliseconds per operation for each process group (from /proc), and their server sum
    (web + worker + PostgreSQL + Redis: what the server's cores pay)."""
    groups = ("web", "worker", "postgresql", "redis")
    out = {g: round(1000 * (after.get(g, 0) - before.get(g, 0)) / max(operations, 1), 2) for g in groups}
    out["server"] = round(sum(out[g] for g in groups), 2)
    return out


def _profiled(stack: Stack, out_dir: Path, label: str, run: Callable[[], Any]) -> dict[str, Any]:
    """`run()` with py-spy on the worker (on-CPU samples only: idle threads excluded, so waiting on
    Twilio or for a rate slot costs nothing here); the top frames, and a flame graph in `out_dir`."""
    exe = py_spy()
    if exe is None:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    pid = stack.processes.started["worker"].pid
    spies = [(fmt, out_dir / f"profile-worker-{label}.{'svg' if fmt == 'flamegraph' else 'txt'}")
             for fmt in ("flamegraph", "raw")]
    started = [(subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
                                  "--format", fmt, "-o", str(path)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True), path) for fmt, path in spies]
    try:
        run()
    finally:
        for process, _ in started:
            process.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
    raw = spies[1][1]
    return top_frames(raw, limit=25) if raw.exists() else {}


def run_worker_scenarios(stack: Stack, limits: list[int], backlog_seconds: float, rates: list[int],
                         duration: float, drain_timeout: float, turn_limit: int,
                         profile_dir: Path | None = None) -> dict[str, Any]:
    """Issue 17's worker figures: a backlog drained at each send limit (worker CPU per send), and
    conversation turns with callbacks on (server CPU per turn by process group, from the load's
    start until every reply and its callbacks are in; inbound -> reply latency)."""
    out: dict[str, Any] = {"backlog": {}, "turns": {}, "turn_limit": turn_limit}
    try:
        for limit in limits:
            restart_worker(stack, TWILIO_MESSAGES_PER_SECOND=str(limit))
            size = int(min(limit * backlog_seconds, 2000))
            log(f"worker: backlog of {size} at TWILIO_MESSAGES_PER_SECOND={limit}")
            out["backlog"][str(limit)] = {"limit": limit, **run_backlog(
                stack, size, drain_timeout, False, Path("."), label="worker-limited" if limit < 200 else "worker-backlog")}
            if profile_dir is not None:  # apart: py-spy's own CPU would share the cores measured above
                log(f"worker: the same backlog again, under py-spy ({profile_dir})")
                out["backlog"][str(limit)]["profile"] = _profiled(stack, profile_dir, f"send-{limit}", lambda: run_backlog(
                    stack, size, drain_timeout, False, Path("."), label="profiled"))
        restart_worker(stack, TWILIO_MESSAGES_PER_SECOND=str(turn_limit))
        for rate in rates:
            log(f"worker: turns at {rate}/s for {duration:.0f} s (send limit {turn_limit}/s)")
            before = cpu_snapshot(stack)
            turns = run_turns(stack, rate, duration, drain_timeout, label="worker-turns")
            after = cpu_snapshot(stack)
            done = turns["reply_handed_to_twilio"].get("delivered") or 0
            turns["cpu_ms_per_turn"] = cpu_per_operation(before, after, done)
            out["turns"][str(rate)] = turns
            if profile_dir is not None:
                log(f"worker: turns at {rate}/s again, under py-spy ({profile_dir})")
                turns["profile"] = _profiled(stack, profile_dir, f"turns-{rate}", lambda: run_turns(
                    stack, rate, duration, drain_timeout, label="profiled"))
    finally:
        restart_worker(stack)
    return out


def run_baselines(stack: Stack, rates: list[int], ceiling_rates: list[int], duration: float,
                  workdir: Path) -> dict[str, Any]:
    """bench/bare_app.py on the Procfile's gunicorn line (only the app module differs)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web_line = procfile()["web"]
    command = web_line.replace("wsgi:app", "bare_app:app", 1)
    env = {**stack.env, "PORT": str(port), "BENCH_PUBLIC_BASE": base, "TWILIO_API_URL": stack.sim.url,
           "PYTHONPATH": str(ROOT / "bench")}
    stack.processes.start("bare", command, env)
    stack.rss.watch("bare web", stack.processes.started["bare"].pid)
    out: dict[str, Any] = {"command": command, "bare": {}, "naive": {}}
    try:
        wait_healthy(base + "/")  # 404 is an answer: the server is up
        for rate in sorted(set(rates + ceiling_rates)):
            url = base + "/twilio/webhook"
            log(f"baseline bare webhook at {rate}/s")
            samples = open_loop(rate, duration, lambda i: (url, signed_form(url, inbound_form(phone("turns", 99, i), "hi")), ""))
            out["bare"][str(rate)] = load_stats(samples, rate, duration, 200)
        for rate in rates:
            url = base + "/naive"
            log(f"baseline naive (Twilio inside the request) at {rate}/s")
            stack.sim.reset()
            samples = open_loop(rate, duration, lambda i: (url, signed_form(url, inbound_form(phone("turns", 98, i), "hi")), ""))
            out["naive"][str(rate)] = load_stats(samples, rate, duration, 200)
            out["naive"][str(rate)]["handed_to_twilio"] = len(stack.sim.timings)
    finally:
        stack.processes.stop("bare")
    return out


def machine_info() -> dict[str, Any]:
    versions = {}
    for dist in ("flask", "gunicorn", "huey", "twilio", "sqlalchemy", "psycopg", "redis", "aiohttp", "py-spy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)

    def git(*args: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(["git", *args], cwd=TREE, capture_output=True, text=True, timeout=10).stdout.strip()
        return ""

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def recreate_database(url: str) -> None:
    """DROP and CREATE the benchmark database (connecting to the server's `postgres` database)."""
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    if not name or name in ("postgres", "test", "template0", "template1"):
        raise SystemExit(f"refusing to drop database {name!r}: give --database-url a dedicated database")
    with psycopg.connect(with_db(url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def clean_redis(url: str, queue: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    # Huey strips everything but [a-z0-9] from the queue name in its key names.
    clean = "".join(c for c in queue.lower() if c.isalnum())
    keys = list({*r.scan_iter(match=f"*{queue}*"), *r.scan_iter(match=f"*{clean}*")})
    if keys:
        r.delete(*keys)
    return len(keys)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so `finally:` blocks stop what was started."""
    def handler(*_: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def procfile_env(config: dict[str, Any], port: int, overrides: dict[str, str]) -> dict[str, str]:
    """The environment of the Procfile's processes: this one's, minus any inherited
    TWILIO_*/DATABASE_URL/REDIS_URL/sizing (like tests/faults/test_processes.py), plus `config`,
    the venv's bin first on PATH, `PORT`, then `overrides` (`--set`)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWILIO_", "DATABASE_URL", "REDIS_URL", "WEB_CONCURRENCY", "WORKER_THREADS"))}
    env.pop("PYTHONPATH", None)
    env.update({k: str(v) for k, v in config.items()})
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PORT"] = str(port)
    env.update(overrides)
    return env


def start_procfile(stack: "Stack", workdir: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """The Procfile's `release` (to its end), then `web` and `worker`, their RSS watched, until
    /healthz answers; returns (web, worker)."""
    commands = procfile()
    subprocess.run(["bash", "-c", commands["release"]], env=stack.env, cwd=workdir, check=True,
                   capture_output=True, timeout=120)
    web = stack.processes.start("web", commands["web"], stack.env)
    worker = stack.processes.start("worker", commands["worker"], stack.env)
    stack.rss.watch("web", web.pid)
    stack.rss.watch("worker", worker.pid)
    stack.rss.start()
    wait_healthy(stack.base + "/healthz")
    return web, worker


def run_tree(args: argparse.Namespace, only: set[str], overrides: dict[str, str], rates: list[int],
             ceiling: list[int], out_dir: Path) -> dict[str, Any]:
    """Every scenario in `only` on the tree `TREE` (its Procfile, its code), from a fresh database."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    queue = "bench-" + uuid.uuid4().hex[:8]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    webhook = base + "/twilio/webhook"
    results: dict[str, Any] = {"machine": machine_info(), "settings": {
        "latency_ms": args.latency_ms, "rates": rates, "ceiling_rates": ceiling, "duration_s": args.duration,
        "callback_delay_s": CALLBACK_DELAY, "procfile": procfile(), "workdir": str(workdir),
        "scenarios": sorted(only), "environment": overrides, "status_callbacks": args.callbacks,
        "simulator_process": args.simulator_process}}
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir} (process logs), queue {queue}")
    recreate_database(args.database_url)

    sim_options = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "webhook_url": webhook,
                   "auto_callbacks": args.callbacks, "callback_delay": CALLBACK_DELAY,
                   "latency": args.latency_ms / 1000}
    sim: Any
    if args.simulator_process:
        # Twilio is a remote service: its stand-in gets a process and an interpreter of its own, so
        # the open-loop generator's event loop and the simulator's threads do not share one GIL and
        # each one's CPU is counted apart (bench/sim_process.py).
        sim = SimulatorProcess(**sim_options)
        sendgrid_key, sendgrid_public = dev_api_key(AUTH_TOKEN), public_key_text(dev_private_key(AUTH_TOKEN))
    else:
        sim = TwilioSimulator(**sim_options).start()
        sim.sendgrid.latency = args.latency_ms / 1000
        sim.sendgrid.events_url = base + "/sendgrid/events"
        sendgrid_key, sendgrid_public = sim.sendgrid.api_key, sim.sendgrid.public_key
    config = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
              "TWILIO_WHATSAPP_NUMBER": SENDER, "TWILIO_WEBHOOK_URL": webhook, "TWILIO_API_URL": sim.url,
              "NOTIFY_API_TOKEN": API_TOKEN, "DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url,
              "QUEUE_NAME": queue, "INSTANCE_PATH": str(workdir),
              # Email through the same simulator's SendGrid side, answering in the same latency.
              "SENDGRID_API_KEY": sendgrid_key, "SENDGRID_API_URL": sim.url, "EMAIL_FROM": EMAIL_FROM,
              "SENDGRID_WEBHOOK_PUBLIC_KEY": sendgrid_public, "SECRET_KEY": SECRET_KEY}
    # The tree's own code, whichever venv's editable install runs it.
    tree = {"PYTHONPATH": str(TREE)} if TREE != ROOT else {}
    env = procfile_env(config, port, {**tree, **overrides})
    processes = Processes(workdir)
    rss = RssSampler()
    stack = Stack(base=base, webhook=webhook, config=config, env=env, sim=sim, processes=processes, rss=rss)
    try:
        with terminate_on_sigterm():
            start_procfile(stack, workdir)
            time.sleep(1)  # let the consumer's threads start polling

            if "backlog" in only:
                log(f"backlog: {args.backlog} pending sends drained by the worker")
                results["backlog"] = run_backlog(stack, args.backlog, args.drain_timeout, False, out_dir)
                if args.profile:  # apart: py-spy's own CPU would lower the figure above
                    log("backlog again, under py-spy")
                    results["backlog"]["profile"] = run_backlog(
                        stack, args.backlog // 2, args.drain_timeout, True, out_dir, label="profiled").get("profile", {})
            if "notify" in only:
                results["notify"] = {}
                for rate in rates:
                    log(f"/notify at {rate}/s for {args.duration:.0f} s")
                    results["notify"][str(rate)] = run_notify(stack, rate, args.duration, args.drain_timeout,
                                                              args.profile and rate == max(rates), out_dir)
            if "turns" in only:
                results["turns"] = {}
                for rate in rates:
                    log(f"conversation turns (inbound 'feedback') at {rate}/s for {args.duration:.0f} s")
                    results["turns"][str(rate)] = run_turns(stack, rate, args.duration, args.drain_timeout)
            if "baselines" in only:
                log("baselines")
                results["baselines"] = run_baselines(stack, rates, ceiling, args.duration, workdir)
            if "two_workers" in only:
                log("two worker processes: backlog, turns, and the shared rate limit")
                results["two_workers"] = run_two_workers(stack, args.backlog, max(rates), args.duration,
                                                         args.drain_timeout, args.limited_rate)
            if "queries" in only:
                log("statement counts")
                results["queries"] = count_queries(config, base, sim, args.query_count_ops)
            if "history" in only and args.history:
                log(f"{args.history:,} historical messages, then the backlog and turns again")
                results["history"] = {"seed": seed_history(args.database_url, args.history)}
                results["history"]["backlog"] = run_backlog(stack, args.backlog, args.drain_timeout, False,
                                                            out_dir, label="history-backlog")
                results["history"]["turns"] = run_turns(stack, max(rates), args.duration, args.drain_timeout,
                                                        label="history-turns")
                results["history"]["queries"] = count_queries(config, base, sim, args.query_count_ops, run=1)
            if "email" in only:
                log("email beside WhatsApp: backlogs drained alone and together")
                results["email"] = run_email(stack, args.email_backlog, args.backlog, args.drain_timeout)
            if "worker" in only:
                log("worker figures (issue 17): backlogs at each send limit, turns with callbacks")
                results["worker"] = run_worker_scenarios(
                    stack, [int(x) for x in args.worker_limits.split(",") if x.strip()], 10.0,
                    [int(x) for x in args.worker_rates.split(",") if x.strip()], args.duration,
                    args.drain_timeout, args.worker_turn_limit,
                    Path(args.worker_profile) / TREE.name if args.worker_profile else None)
            results["rss"] = rss.report()
    except BaseException as exc:
        # Keep what was measured: a late failure must not throw away a long run.
        results["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        results.setdefault("rss", rss.report())
        (out_dir / "results-partial.json").write_text(json.dumps(results, indent=2) + "\n")
        log(f"failed ({results['error']}); what was measured is in {out_dir / 'results-partial.json'}")
        raise
    finally:
        rss.stop()
        processes.stop_all()
        sim.stop()
        removed = clean_redis(args.redis_url, queue)
        log(f"stopped everything; removed {removed} Redis key(s) of queue {queue}")

    return results


def main(argv: list[str] | None = None) -> None:
    global TREE, QUIET_TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=150, help="simulated Twilio API latency (default 150)")
    parser.add_argument("--rates", default="80,200", help="offered rates, requests per second (default 80,200)")
    parser.add_argument("--ceiling-rates", default="400,800",
                        help="extra rates for the bare baseline, to find its ceiling (default 400,800)")
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per scenario and rate")
    parser.add_argument("--drain-timeout", type=float, default=240,
                        help="seconds to wait for the backlog to reach Twilio after each run")
    parser.add_argument("--query-count-ops", type=int, default=20, help="operations for the statement counts")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/bench",
                        help="a dedicated database: it is DROPPED and recreated")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip py-spy")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="where results.json and THROUGHPUT.md go")
    parser.add_argument("--only", default="backlog,notify,turns,baselines,two_workers,queries,history,email",
                        help="scenarios to run, comma-separated (default all: "
                             "backlog,notify,turns,baselines,two_workers,queries,history,email)")
    parser.add_argument("--history", type=int, default=1_000_000,
                        help="historical messages stored before the last scenarios rerun (0: skip)")
    parser.add_argument("--limited-rate", type=int, default=80,
                        help="TWILIO_MESSAGES_PER_SECOND for the two-worker rate limit check")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for web and worker, e.g. WORKER_THREADS=64 (repeatable)")
    parser.add_argument("--backlog", type=int, default=2000, help="messages in the backlog scenario")
    parser.add_argument("--email-backlog", type=int, default=2000, help="emails in the email scenario")
    parser.add_argument("--worker-limits", default="1000,80",
                        help="worker scenario: TWILIO_MESSAGES_PER_SECOND of each backlog drain (default 1000,80)")
    parser.add_argument("--worker-rates", default="80,150",
                        help="worker scenario: offered turns per second (default 80,150)")
    parser.add_argument("--worker-turn-limit", type=int, default=1000,
                        help="worker scenario: the send limit while turns run (default 1000)")
    parser.add_argument("--quiet-timeout", type=float, default=120.0,
                        help="seconds each scenario waits for the machine to be nearly idle (default 120)")
    parser.add_argument("--worker-profile", default=None, metavar="DIR",
                        help="worker scenario: each drain and each turn rate again under py-spy, profiles in DIR")
    parser.add_argument("--baseline-tree", default=None,
                        help="another source tree (e.g. main in a second worktree): the same scenarios run "
                             "on it too, in the same run, and land in results['before']")
    parser.add_argument("--simulator-process", action="store_true",
                        help="run the Twilio simulator in a process of its own (bench/sim_process.py; "
                             "only with --only turns and/or notify, which read nothing else of it)")
    parser.add_argument("--no-callbacks", dest="callbacks", action="store_false",
                        help="the simulator posts no status callbacks (the send path on its own)")
    args = parser.parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    if args.simulator_process and not only <= {"turns", "notify"}:
        parser.error("--simulator-process runs only with --only turns and/or notify")
    overrides = dict(item.split("=", 1) for item in args.settings)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    ceiling = [int(r) for r in args.ceiling_rates.split(",") if r.strip()]
    out_dir = Path(args.out)

    QUIET_TIMEOUT = args.quiet_timeout
    results = run_tree(args, only, overrides, rates, ceiling, out_dir)
    if args.baseline_tree:
        TREE = Path(args.baseline_tree).resolve()
        log(f"the same scenarios on the baseline tree {TREE}")
        try:
            before = run_tree(args, only, overrides, rates, ceiling, out_dir)
        finally:
            TREE = ROOT
        results["before"] = {k: v for k, v in before.items() if k not in ("settings",)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import write_report  # bench/report.py, next to this file

    write_report(results, out_dir / "THROUGHPUT.md")
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'THROUGHPUT.md'}")


if __name__ == "__main__":
    main()
