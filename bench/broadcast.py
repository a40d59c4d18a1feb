"""Benchmark: a broadcast to 100,000 people beside conversation turns, on the real deployment shape.

One command, PostgreSQL and Redis local::

    .venv/bin/python bench/broadcast.py --audience 100000 --turn-rate 20 --duration 30

What it does, in order (the Procfile's `release`, `web` and `worker` lines, verbatim, as
bench/throughput.py runs them, whose helpers it uses):

1. drops and recreates the benchmark database, starts the Twilio simulator in a process of its own
   (``--latency-ms`` of API latency; no automatic status callbacks unless ``--callbacks``;
   ``--simulator-in-process`` for the earlier runs' shape), the web and one worker with
   TWILIO_MESSAGES_PER_SECOND=``--rate`` and BROADCAST_RATE_SHARE=``--share``;
2. stores ``--audience`` users (ids, phones, names) in one bulk insert;
3. **turns alone**: signed inbound "feedback" at ``--turn-rate``/s for ``--duration`` s, each
   matched to its reply at the simulator (inbound → reply handed to Twilio);
4. **a small broadcast** (``--small-audience`` users): answer time, recipients resolved per
   second, the worker's peak RSS while it expands; then canceled;
5. **the broadcast**: POST /broadcasts with all ``--audience`` user ids in one request (answer
   time, body size), recipients resolved per second while it expands, the worker's peak RSS;
   then its sends per second at the simulator over ``--duration`` s alone, and over the same
   length **with turns at ``--turn-rate``/s** (inbound → reply, the same measure as step 3);
   then canceled, and its counts read back;
6. with ``--rounds N``: N rounds of turns alone, then beside a new broadcast of
   ``--round-audience``, canceled after; the latencies pooled per side (one window each is too
   few turns for a p99: on an idle machine the same code's single-window ratio ranged from 0.8
   to 2.9).

Writes bench/results-broadcast.json. A benchmark, not a test: nothing here asserts a speed; the
targets (issue 19) are read off the figures in bench/THROUGHPUT.md's "Broadcasts" section.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import timezone
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402
from throughput import (ACCOUNT_SID, API_TOKEN, AUTH_TOKEN, SENDER, Processes, RssSampler, clean_redis,  # noqa: E402
                        cpu_snapshot, cpu_split, end_to_end, first_creates, free_port, inbound_form, load_stats, log,
                        machine_info, open_loop, process_tree, procfile, procfile_env, recreate_database, rss_kib, seed_contacts,
                        signed_form, start_procfile, summary, terminate_on_sigterm, wait_for_creates, wait_for_quiet,
                        Stack)

from bot.devtools.simulator import TwilioSimulator  # noqa: E402
from sim_process import SimulatorProcess  # noqa: E402

TEMPLATE_SID = "HX" + "b2" * 16
AUDIENCE_PREFIX = "+1559"  # the broadcast's users: +1559 0000000 ...
TURN_PREFIXES = {"alone": "+1546", "beside": "+1545"}


def audience_phone(i: int) -> str:
    return f"{AUDIENCE_PREFIX}{i:07d}"


def seed_audience(database_url: str, count: int) -> None:
    """`count` opted-in users (user id, phone, name), in bulk inserts of 10,000."""
    import sqlalchemy as sa

    from bot.clock import utcnow
    from bot.config import database_uri
    from bot.models import Contact

    engine = sa.create_engine(database_uri(database_url, "."))
    now = utcnow()
    with engine.begin() as conn:
        for start in range(0, count, 10_000):
            conn.execute(sa.insert(Contact.__table__), [
                {"user_id": f"b{i}", "phone": audience_phone(i), "name": f"Person {i}", "consent": "opted_in",
                 "email_consent": "unknown", "created_at": now, "updated_at": now}
                for i in range(start, min(start + 10_000, count))])
    engine.dispose()


def tree_rss_mib(pid: int) -> float:
    return sum(rss_kib(p) or 0 for p in process_tree(pid)) / 1024


class Peak(threading.Thread):
    """The worker tree's largest RSS while it runs (every 0.2 s)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            self.peak = max(self.peak, tree_rss_mib(self.pid))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return round(self.peak, 1)


class DiskFlushProbe(threading.Thread):
    """Writes 8 KiB to a file and flushes it to disk (`fdatasync`) every 50 ms, keeping each
    flush over STALL_MS: a stall of the machine's disk, which every commit waits out too (each
    turn commits three times, PostgreSQL flushing its log each time). On 2026-12-07 the slowest
    replies of a round that were no collection and no steal matched these stalls to within 50
    ms: flushes of 98-161 ms, replies of 190-251 ms (bench/THROUGHPUT.md, "Broadcasts", eleventh
    run). The file lies in the run's workdir (on this machine the disk of PostgreSQL's log too)."""

    STALL_MS = 50.0
    EVERY_S = 0.05

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True, name="disk-flush-probe")
        self.path, self.stalls, self._done = directory / "flush-probe", [], threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while not self._done.wait(self.EVERY_S):
                started = time.time()
                os.pwrite(fd, b"x" * 8192, 0)
                os.fdatasync(fd)
                took_ms = (time.time() - started) * 1000
                if took_ms > self.STALL_MS:
                    self.stalls.append([round(started, 3), round(took_ms, 1)])
        finally:
            os.close(fd)

    def between(self, since: float, until: float) -> list[list[float]]:
        """The stalls that began in [since - 1 s, until]: [epoch s, ms] each (a stall begun just
        before a window still holds up the window's first commits)."""
        return [stall for stall in list(self.stalls) if since - 1 <= stall[0] <= until]

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def broadcast(stack: Stack, worker_pid: int, size: int) -> dict[str, Any]:
    """POST one broadcast to users b0..b<size-1>; follow its expansion; return the figures and its URL."""
    body = json.dumps({"audience": {"user_ids": [f"b{i}" for i in range(size)]}, "template": "order_update",
                       "variables": {"1": "$user.name", "2": "late opening"}})
    rss_before = round(tree_rss_mib(worker_pid), 1)
    peak = Peak(worker_pid)
    peak.start()
    started = time.monotonic()
    answer = requests.post(stack.base + "/broadcasts", data=body,
                           headers={**headers(), "Content-Type": "application/json",
                                    "Idempotency-Key": uuid.uuid4().hex}, timeout=60)
    answered = time.monotonic() - started
    answer.raise_for_status()
    url = stack.base + answer.json()["url"]
    first, samples = None, []
    while True:
        state = requests.get(url, headers=headers(), timeout=30).json()
        now = time.monotonic()
        samples.append((now, state["recipients"]))
        if first is None and state["recipients"] > 0:
            first = samples[-1]
        if state["state"] != "expanding" or now - started > 600:
            break
        time.sleep(0.5)
    last = samples[-1]
    expanding_s = (last[0] - first[0]) if first else None
    return {"audience": size, "body_mib": round(len(body) / 2 ** 20, 2), "answer_ms": round(answered * 1000, 1),
            "answer_status": answer.status_code, "state_after": state["state"],
            "recipients": state["recipients"], "skipped": state["skipped"],
            "expanded_in_s": round(last[0] - started, 1),
            "recipients_per_second": round((last[1] - first[1]) / expanding_s, 0) if expanding_s else None,
            "worker_rss_mib_before": rss_before, "worker_rss_mib_peak_while_expanding": peak.stop(), "url": url}


def sends_per_second(sim: TwilioSimulator, since: float, until: float) -> dict[str, Any]:
    """The broadcast's creates at the simulator between two wall-clock times."""
    arrivals = sorted(t["received_at"] for t in sim.timings
                      if t["to"].startswith("whatsapp:" + AUDIENCE_PREFIX) and since <= t["received_at"] <= until)
    per_second: dict[int, int] = {}
    for at in arrivals:
        per_second[int(at - since)] = per_second.get(int(at - since), 0) + 1
    return {"sends": len(arrivals), "seconds": round(until - since, 1),
            "per_second": round(len(arrivals) / max(until - since, 1e-9), 1),
            "busiest_second": max(per_second.values(), default=0)}


def reply_rows(database_url: str, prefix: str) -> dict[str, tuple[float, float]]:
    """Each turn's clocks from its rows (the same machine's as the simulator's), by the contact's
    phone: (its inbound row stored by the web, its reply row written by the turn), epoch seconds."""
    import sqlalchemy as sa

    from bot.config import database_uri

    engine = sa.create_engine(database_uri(database_url, "."))
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT c.phone, i.created_at AS inbound, MIN(r.created_at) AS reply FROM messages i "
            "JOIN contacts c ON c.id = i.contact_id "
            "JOIN messages r ON r.contact_id = i.contact_id AND r.direction = 'outbound' "
            "WHERE i.direction = 'inbound' AND c.phone LIKE :prefix GROUP BY c.phone, i.created_at"),
            {"prefix": prefix + "%"}).all()
    engine.dispose()
    epoch = lambda naive: naive.replace(tzinfo=timezone.utc).timestamp()  # noqa: E731
    return {phone: (epoch(inbound), epoch(reply)) for phone, inbound, reply in rows}


def reply_segments(rows: dict[str, tuple[float, float]], prefix: str, timings: list[dict[str, Any]],
                   numbered_from: int = 0) -> dict[str, Any]:
    """Where each turn's time went (`rows`: `reply_rows` for `prefix`): *to_turn*: the inbound row stored by the web →
    its reply row written by the turn (the queue's wait, the turn task's pick-up and the flow);
    *to_twilio*: the reply row written → its create at the simulator (the commit, the hand-over,
    the rate slot, the HTTP call). `numbered_from`: only the contacts numbered from there (the
    rounds': pooled across them)."""
    created = first_creates(timings)
    to_turn, to_twilio = [], []
    for phone, (inbound, reply) in rows.items():
        if int(phone[len(prefix):]) < numbered_from:
            continue
        to_turn.append(reply - inbound)
        if "whatsapp:" + phone in created:
            to_twilio.append(created["whatsapp:" + phone] - reply)
    return {"inbound_stored_to_reply_written": summary(to_turn),
            "reply_written_to_twilio": summary(to_twilio)}


def reply_latencies(samples: list[Any], timings: list[dict[str, Any]]) -> list[float]:
    """Each request's inbound → reply-at-the-simulator time, in seconds (as end_to_end counts it)."""
    created = first_creates(timings)
    return [created[s.key] - s.scheduled for s in samples if s.key in created]


def interleaved(stack: Stack, worker_pid: int, args: argparse.Namespace,
                probe: DiskFlushProbe | None = None) -> dict[str, Any]:
    """`--rounds` of: turns alone, then a broadcast of `--round-audience` (expanded, at its pace),
    turns beside it, the broadcast canceled. The rounds' latencies are pooled per side, so the
    p99 of each rests on rounds × rate × duration turns, taken alternately (a drift of the
    machine, a checkpoint, falls on both sides alike), not on one window each."""
    pooled: dict[str, list[float]] = {"alone": [], "beside": []}
    # The same, over the rounds in which the host took no CPU from this machine on either side
    # (steal, /proc/stat): one stall of the host delays every turn in flight by its length, and
    # falls on whichever side was running (bench/THROUGHPUT.md, "Broadcasts", tenth run).
    unstolen: dict[str, list[float]] = {"alone": [], "beside": []}
    # The same over the rounds with neither steal nor a stall of the disk's flushes (`probe`):
    # a stall holds up every commit, so every turn in flight, on whichever side it falls.
    undisturbed: dict[str, list[float]] = {"alone": [], "beside": []}
    per_round, sends, seconds = [], 0, 0.0
    for number in range(args.rounds):
        first = (number + 1) * 100_000  # past the single-window phases' contacts
        wait_for_quiet(timeout=15)
        alone = turns(stack, "alone", args.turn_rate, args.round_duration, args.drain_timeout, first=first,
                      probe=probe)
        big = broadcast(stack, worker_pid, args.round_audience)
        time.sleep(5)  # its sends reach their pace
        beside = turns(stack, "beside", args.turn_rate, args.round_duration, args.drain_timeout, first=first,
                       probe=probe)
        requests.post(big["url"] + "/cancel", headers=headers(), timeout=60)
        drain = sends_per_second(stack.sim, *beside["window"])
        sends, seconds = sends + drain["sends"], seconds + drain["seconds"]
        time.sleep(3)
        steal = {label: run["cores_during_load"].get("steal", 0.0) for label, run in (("alone", alone), ("beside", beside))}
        stalls = {label: run["disk_flush_stalls"] for label, run in (("alone", alone), ("beside", beside))}
        for label, run in (("alone", alone), ("beside", beside)):
            latencies = run.pop("reply_latencies_s")
            pooled[label] += latencies
            if not any(steal.values()):
                unstolen[label] += latencies
                if probe is not None and not any(stalls.values()):
                    undisturbed[label] += latencies
        per_round.append({**{label: run["reply_handed_to_twilio"]["latency"] for label, run in
                             (("alone", alone), ("beside", beside))}, "broadcast_beside_turns": drain,
                          "steal_cores": steal, "disk_flush_stalls": stalls,
                          "slowest": {label: run["slowest"] for label, run in (("alone", alone), ("beside", beside))}})
        log(f"  round {number + 1}: reply p99 alone {per_round[-1]['alone']['p99_ms']} ms, "
            f"beside {per_round[-1]['beside']['p99_ms']} ms")
    stats = {label: summary(values) for label, values in pooled.items()}
    ratio = p99_ratio(stats)
    clean = {label: summary(values) for label, values in unstolen.items()} if unstolen["alone"] else None
    calm = {label: summary(values) for label, values in undisturbed.items()} if undisturbed["alone"] else None
    # Where the time went, pooled over the rounds too (the rounds' contacts are numbered from 100,000).
    timings = stack.sim.timings  # read once: each read copies every create of the run over a pipe
    segments = {label: reply_segments(reply_rows(stack.config["DATABASE_URL"], TURN_PREFIXES[label]),
                                      TURN_PREFIXES[label], timings, numbered_from=100_000) for label in pooled}
    return {"rounds": args.rounds, "round_duration_s": args.round_duration, "round_audience": args.round_audience,
            "pooled": stats, "reply_p99_ratio": ratio, "pooled_segments": segments,
            "rounds_without_steal": sum(1 for r in per_round if not any(r["steal_cores"].values())),
            "pooled_without_steal": clean, "reply_p99_ratio_without_steal": p99_ratio(clean) if clean else None,
            "rounds_undisturbed": sum(1 for r in per_round if not any(r["steal_cores"].values())
                                      and probe is not None and not any(r["disk_flush_stalls"].values())),
            "pooled_undisturbed": calm, "reply_p99_ratio_undisturbed": p99_ratio(calm) if calm else None,
            "broadcast_beside_turns": {"sends": sends, "seconds": round(seconds, 1),
                                       "per_second": round(sends / seconds, 1) if seconds else None,
                                       "target_per_second": round(args.rate * args.share, 1)},
            "per_round": per_round}


def p99_ratio(stats: dict[str, Any]) -> float | None:
    """Beside's p99 over alone's, to two places (None without both)."""
    alone, beside = stats["alone"].get("p99_ms"), stats["beside"].get("p99_ms")
    return round(beside / alone, 2) if alone and beside else None


def turns(stack: Stack, label: str, rate: int, duration: float, drain_timeout: float,
          first: int = 0, probe: DiskFlushProbe | None = None) -> dict[str, Any]:
    """Signed inbound 'feedback' from distinct opted-in contacts (numbered from `first`); each
    reply matched at the simulator; with `probe`, the disk's flush stalls meanwhile."""
    phones = [f"{TURN_PREFIXES[label]}{i:07d}" for i in range(first, first + int(rate * duration))]
    seed_contacts(stack.config["DATABASE_URL"], phones)

    def make(i: int) -> tuple[str, dict[str, Any], str]:
        return stack.webhook, signed_form(stack.webhook, inbound_form(phones[i], "feedback")), "whatsapp:" + phones[i]

    cpu_before, started = cpu_snapshot(stack), time.monotonic()
    samples = open_loop(rate, duration, make)
    cores = cpu_split(cpu_before, cpu_snapshot(stack), time.monotonic() - started)
    drained = wait_for_creates(stack.sim, {s.key for s in samples if s.status == 200}, drain_timeout)
    # Read once: from the stand-in's process each read copies every create of the run over a pipe.
    timings = stack.sim.timings
    rows = reply_rows(stack.config["DATABASE_URL"], TURN_PREFIXES[label])
    return {"cores_during_load": cores, "inbound_webhook": load_stats(samples, rate, duration, 200),
            "reply_handed_to_twilio": {**end_to_end(samples, timings, duration), "drained": drained},
            "segments": reply_segments(rows, TURN_PREFIXES[label], timings),
            "reply_latencies_s": reply_latencies(samples, timings),
            "slowest": slowest(samples, timings, rows),
            "disk_flush_stalls": probe.between(min(s.scheduled for s in samples), time.time()) if probe else None,
            "window": [min(s.scheduled for s in samples), max(s.done for s in samples)]}


def slowest(samples: list[Any], timings: list[dict[str, Any]],
            rows: dict[str, tuple[float, float]] | None = None, count: int = 15) -> list[list[float | None]]:
    """The `count` slowest replies: [when the inbound was due (epoch s), inbound → reply at the
    simulator (ms), how late the load generator sent it (ms)]: whether a p99 rests on one stall
    of the machine (clustered in time, the generator late too) or on many replies' own waits.
    With `rows` (`reply_rows`), three more: due → the inbound row stored (the web), → the reply
    row written (the queue and the turn), → the create at the simulator (the send), in ms, None
    for a reply with no rows; which of the three a slow reply lost its time in."""
    created = first_creates(timings)
    found = sorted(((s.scheduled, created[s.key] - s.scheduled, s.started - s.scheduled, s.key)
                    for s in samples if s.key in created), key=lambda item: -item[1])[:count]
    slow = []
    for at, took, late, key in found:
        entry: list[float | None] = [round(at, 3), round(took * 1000, 1), round(late * 1000, 1)]
        if rows is not None:
            stored, written = rows.get(key.removeprefix("whatsapp:"), (None, None))
            entry += [round((stored - at) * 1000, 1), round((written - stored) * 1000, 1),
                      round((created[key] - written) * 1000, 1)] if stored is not None else [None] * 3
        slow.append(entry)
    return slow


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audience", type=int, default=100_000)
    parser.add_argument("--small-audience", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=80, help="TWILIO_MESSAGES_PER_SECOND (default 80)")
    parser.add_argument("--share", type=float, default=0.8, help="BROADCAST_RATE_SHARE (default 0.8)")
    parser.add_argument("--turn-rate", type=int, default=20, help="conversation turns offered per second")
    parser.add_argument("--duration", type=float, default=30, help="seconds of each measured window")
    parser.add_argument("--latency-ms", type=float, default=150, help="simulated Twilio API latency")
    parser.add_argument("--drain-timeout", type=float, default=120)
    parser.add_argument("--callbacks", action="store_true", help="the simulator posts status callbacks")
    parser.add_argument("--simulator-in-process", action="store_true",
                        help="run the Twilio simulator in this process, as runs before 2026-12-07 did "
                             "(default: a process of its own, bench/sim_process.py)")
    parser.add_argument("--no-keep-alive", dest="keep_alive", action="store_false",
                        help="the simulator's API on werkzeug's server, one connection per create, as runs "
                             "before 2026-12-07's eleventh did (default: waitress, which keeps connections "
                             "open as Twilio's API does; bench/sim_process.py)")
    parser.add_argument("--simulator-nice", type=int, default=-10,
                        help="the simulator's niceness (default -10, when allowed: Twilio stamps a create "
                             "when it arrives, not when our load lets it; its CPU still comes off these cores)")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/bench",
                        help="a dedicated database: it is DROPPED and recreated")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for web and worker (repeatable)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="then this many rounds of turns alone / beside a broadcast, pooled (default none)")
    parser.add_argument("--round-duration", type=float, default=15, help="seconds of turns per side and round")
    parser.add_argument("--round-audience", type=int, default=20_000, help="each round's broadcast")
    parser.add_argument("--tree", default=None, metavar="PATH",
                        help="run the server's processes on this source tree's code (a baseline's worktree); "
                             "PYTHONPATH is not passed on to them, this is how to choose their code")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-broadcast.json"))
    args = parser.parse_args(argv)
    if args.tree:
        throughput.TREE = Path(args.tree).resolve()  # machine_info's git commit is that tree's

    workdir = Path(tempfile.mkdtemp(prefix="bench-broadcast-"))
    queue = "bench-" + uuid.uuid4().hex[:8]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    webhook = base + "/twilio/webhook"
    results: dict[str, Any] = {"machine": machine_info(), "settings": {
        "audience": args.audience, "small_audience": args.small_audience, "rate": args.rate, "share": args.share,
        "turn_rate": args.turn_rate, "duration_s": args.duration, "latency_ms": args.latency_ms,
        "status_callbacks": args.callbacks, "simulator_in_process": args.simulator_in_process,
        "simulator_keep_alive": args.keep_alive,
        "tree": str(Path(args.tree).resolve()) if args.tree else str(ROOT),
        "procfile": procfile(), "environment": dict(
            item.split("=", 1) for item in args.settings)}}
    log(f"workdir {workdir} (process logs), queue {queue}")
    recreate_database(args.database_url)
    sim_options = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "webhook_url": webhook,
                   "auto_callbacks": args.callbacks, "callback_delay": 0.5, "latency": args.latency_ms / 1000}
    sim: Any = (TwilioSimulator(**sim_options).start() if args.simulator_in_process
                else SimulatorProcess(keep_alive=args.keep_alive, nice=args.simulator_nice, **sim_options))
    results["settings"]["simulator_niceness"] = getattr(sim, "niceness", None)
    config = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_WHATSAPP_NUMBER": SENDER,
              "TWILIO_WEBHOOK_URL": webhook, "TWILIO_API_URL": sim.url, "NOTIFY_API_TOKEN": API_TOKEN,
              "DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url, "QUEUE_NAME": queue,
              "INSTANCE_PATH": str(workdir), "TWILIO_MESSAGES_PER_SECOND": str(args.rate),
              "BROADCAST_RATE_SHARE": str(args.share),
              "TWILIO_CONTENT_SIDS": json.dumps({"order_update": TEMPLATE_SID})}
    # The tree's own code, whichever venv's editable install runs it (procfile_env drops an
    # inherited PYTHONPATH: before 2026-12-07 `PYTHONPATH=<tree>` on this command ran main's code).
    tree = {"PYTHONPATH": str(Path(args.tree).resolve())} if args.tree else {}
    env = procfile_env(config, port, {**tree, **dict(item.split("=", 1) for item in args.settings)})
    processes = Processes(workdir)
    rss = RssSampler()
    probe = DiskFlushProbe(workdir)
    probe.start()
    stack = Stack(base=base, webhook=webhook, config=config, env=env, sim=sim, processes=processes, rss=rss)
    try:
        with terminate_on_sigterm():
            _, worker = start_procfile(stack, workdir)
            log(f"{args.audience:,} users")
            seed_audience(args.database_url, args.audience)
            time.sleep(1)

            log(f"turns alone at {args.turn_rate}/s for {args.duration:.0f} s")
            wait_for_quiet(timeout=15)
            results["turns_alone"] = turns(stack, "alone", args.turn_rate, args.duration, args.drain_timeout,
                                           probe=probe)

            if args.small_audience:
                log(f"a broadcast to {args.small_audience:,}")
                wait_for_quiet(timeout=15)
                small = broadcast(stack, worker.pid, args.small_audience)
                requests.post(small.pop("url") + "/cancel", headers=headers(), timeout=30)
                results["small_broadcast"] = small
                time.sleep(3)

            log(f"the broadcast to {args.audience:,}")
            wait_for_quiet(timeout=15)
            sim.reset()
            big = broadcast(stack, worker.pid, args.audience)
            url = big.pop("url")
            results["broadcast"] = big
            time.sleep(5)  # its sends reach their pace
            alone_from, cpu_before, started = time.time(), cpu_snapshot(stack), time.monotonic()
            time.sleep(args.duration)
            drain = results["broadcast"]["drain_alone"] = sends_per_second(sim, alone_from, time.time())
            drain["cores"] = cpu_split(cpu_before, cpu_snapshot(stack), time.monotonic() - started)
            # Each process's CPU per broadcast send while nothing else runs (the bulk process is
            # in the worker's tree): what a broadcast costs, apart from how fast it goes.
            drain["cpu_ms_per_send"] = {part: round(1000 * cores * drain["seconds"] / drain["sends"], 2)
                                        for part, cores in drain["cores"].items()
                                        if part not in ("machine", "steal") and drain["sends"]}
            log(f"turns at {args.turn_rate}/s beside it")
            beside = turns(stack, "beside", args.turn_rate, args.duration, args.drain_timeout, probe=probe)
            window = beside.pop("window")
            results["turns_beside_the_broadcast"] = beside
            results["broadcast"]["drain_beside_turns"] = sends_per_second(sim, window[0], window[1])
            canceled = requests.post(url + "/cancel", headers=headers(), timeout=60).json()
            time.sleep(3)
            after = requests.get(url, headers=headers(), timeout=60).json()
            results["broadcast"]["after_cancel"] = {key: after[key] for key in (
                "state", "recipients", "skipped", "queued", "sent", "canceled", "failed")}
            results["broadcast"]["sent_when_canceled"] = canceled.get("sent")
            results["broadcast"]["target_per_second"] = round(args.rate * args.share, 1)
            alone = results["turns_alone"]["reply_handed_to_twilio"]["latency"]["p99_ms"]
            during = results["turns_beside_the_broadcast"]["reply_handed_to_twilio"]["latency"]["p99_ms"]
            results["reply_p99_ratio"] = round(during / alone, 2) if alone and during else None
            for run in ("turns_alone", "turns_beside_the_broadcast"):
                results[run].pop("reply_latencies_s", None)
            if args.rounds:
                log(f"{args.rounds} rounds of turns alone and beside a broadcast of {args.round_audience:,}")
                results["interleaved"] = interleaved(stack, worker.pid, args, probe)
            results["rss"] = rss.report()
            if isinstance(sim, SimulatorProcess):
                pauses = sim.pauses
                results["simulator_gc_pauses"] = {
                    "count": len(pauses), "max_ms": max((p[2] for p in pauses), default=None),
                    "over_20_ms": sum(1 for p in pauses if p[2] > 20)}
    except BaseException as exc:
        results["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")
        raise
    finally:
        probe.stop()
        results["disk_flush_stalls"] = probe.stalls
        rss.stop()
        processes.stop_all()
        sim.stop()
        removed = clean_redis(args.redis_url, queue)
        log(f"stopped everything; removed {removed} Redis key(s) of queue {queue}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")
    print(json.dumps({k: v for k, v in results.items() if k not in ("machine", "rss")}, indent=2))


if __name__ == "__main__":
    main()
