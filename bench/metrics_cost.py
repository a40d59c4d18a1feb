"""What metrics cost (issue 18): request throughput with metrics on and off in the same run, and
the latency of a `GET /metrics` scrape with a million messages stored (bench/METRICS.md).

* **fill**: the schema from the migrations, then `--rows` messages (default 1,000,000) in plain
  SQL, spread like a busy month: 20 % inbound, the rest delivered, read, sent, failed with a mix
  of codes, a backlog of a few thousand waiting in every lane; 100,000 contacts (50 in a
  handoff), half a million events (a few hundred pending, some failed), 50,000 conversations
  (500 open); VACUUM ANALYZE, as autovacuum would have by then.
* **scrape**: the Procfile's web line (gunicorn, two workers) with METRICS_TOKEN; `--scrapes`
  sequential scrapes, each on a new connection; p50 / p99 / max of the whole HTTP answer, and
  of `bot_readings_duration_seconds` (the database and queue part), plus EXPLAIN ANALYZE of each
  readings statement.
* **throughput**: the Procfile's web line with metrics on (METRICS_TOKEN set) and off (unset),
  alternating `--rounds` times per operation (`webhook`: a signed inbound message from a new
  contact each; `notify`: POST /notify {"to", "body"} to contacts inside the window), each round
  `--duration` seconds at `--clients` keep-alive connections from a load process of Python
  threads. The ratio on/off is of the medians of the rounds.

No worker runs: what is measured is the web; queued tasks are flushed.

    .venv/bin/python bench/metrics_cost.py all --database-url postgresql://postgres@127.0.0.1:5432/h18m \
        --redis-url redis://127.0.0.1:6379/3
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import web_cpu  # noqa: E402  (the web benchmark's helpers: schema, seeding, gunicorn, requests)

ROOT = BENCH.parent
METRICS_TOKEN = "bench-metrics-token"


def log(text: str) -> None:
    web_cpu.log(text)


# ----------------------------------------------------------------------------- fill


FILL_SQL = """
INSERT INTO contacts (phone, user_id, wa_id, consent, email_consent, last_inbound_at, handoff_until, created_at, updated_at)
SELECT '+1999' || lpad(i::text, 7, '0'), 'fill-' || i, '1999' || lpad(i::text, 7, '0'), 'opted_in', 'unknown',
       now() at time zone 'utc' - (i % 72) * interval '1 hour',
       CASE WHEN i % 2000 = 0 THEN now() at time zone 'utc' + interval '2 hours' END,
       now() at time zone 'utc' - interval '40 days', now() at time zone 'utc'
FROM generate_series(1, 100000) AS i;

INSERT INTO messages (id, direction, kind, contact_id, channel, body, status, status_rank, error_code, attempts,
                      created_at, updated_at)
SELECT md5('fill' || i), d.direction, d.kind, (SELECT min(id) FROM contacts) + (i % 100000),
       CASE WHEN i % 7 = 0 AND d.direction = 'outbound' THEN 'email' ELSE 'whatsapp' END,
       'Your order ' || i || ' shipped', d.status, d.rank, d.code, 1,
       now() at time zone 'utc' - ((%(rows)s - i) * interval '30 days') / %(rows)s,
       now() at time zone 'utc' - ((%(rows)s - i) * interval '30 days') / %(rows)s
FROM generate_series(1, %(rows)s) AS i,
LATERAL (SELECT
    CASE WHEN i % 5 = 0 THEN 'inbound' ELSE 'outbound' END AS direction,
    CASE WHEN i % 5 = 0 THEN 'inbound' WHEN i % 3 = 0 THEN 'reply' ELSE 'notification' END AS kind,
    CASE WHEN i % 5 = 0 THEN 'processed'
         -- the newest rows: a backlog still to leave
         WHEN i > %(rows)s - 6000 AND i % 4 = 1 THEN 'pending'
         WHEN i > %(rows)s - 6000 AND i % 4 = 2 THEN 'retrying'
         WHEN i > %(rows)s - 6000 AND i % 4 = 3 THEN 'dispatching'
         WHEN i % 100 < 4 THEN 'failed'
         WHEN i % 100 < 6 THEN 'undelivered'
         WHEN i % 100 < 11 THEN 'sent'
         WHEN i % 100 < 28 THEN 'read'
         WHEN i % 100 < 29 THEN 'queued'
         ELSE 'delivered' END AS status) AS s,
LATERAL (SELECT s.direction, s.kind, s.status,
    CASE s.status WHEN 'processed' THEN 0 WHEN 'pending' THEN 0 WHEN 'retrying' THEN 1 WHEN 'dispatching' THEN 1
                  WHEN 'queued' THEN 3 WHEN 'sent' THEN 5 WHEN 'read' THEN 7 ELSE 6 END AS rank,
    CASE WHEN s.status IN ('failed', 'undelivered')
         THEN (ARRAY[63016, 63024, 63003, 30008, 21610, 63049, NULL])[1 + i % 7] END AS code) AS d;

INSERT INTO events (txid, id, type, contact_id, message_id, data, created_at, status, attempts, delivered_at)
SELECT 1, md5('event' || i), 'message.status', (SELECT min(id) FROM contacts) + (i % 100000), md5('fill' || i), '{}',
       now() at time zone 'utc' - ((500000 - i) * interval '30 days') / 500000,
       CASE WHEN i > 499700 THEN 'pending' WHEN i % 10000 = 0 THEN 'failed' ELSE 'delivered' END,
       1, now() at time zone 'utc'
FROM generate_series(1, 500000) AS i;

INSERT INTO conversations (id, contact_id, flow, state, status, data, started_by, started_at, updated_at, attempts)
SELECT md5('conversation' || i), (SELECT min(id) FROM contacts) + (i % 100000),
       (ARRAY['welcome', 'appointment', 'survey', 'order_status', 'feedback'])[1 + i % 5], 'start',
       CASE WHEN i % 100 = 0 THEN 'active' ELSE 'completed' END, '{}', 'user',
       now() at time zone 'utc', now() at time zone 'utc', 0
FROM generate_series(1, 50000) AS i;
"""


def fill(database_url: str, redis_url: str, rows: int) -> dict[str, Any]:
    import psycopg

    env = web_cpu.bench_env(ROOT, database_url, redis_url, "http://127.0.0.1")
    log("schema from the migrations")
    web_cpu.recreate_schema(ROOT, env)
    started = time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(FILL_SQL.replace("%(rows)s", str(int(rows))))
        conn.execute("VACUUM ANALYZE")
        counts = dict(conn.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall())
    log(f"filled {rows:,} messages in {time.monotonic() - started:.0f} s: {counts}")
    return {"rows": rows, "by_status": counts}


# ----------------------------------------------------------------------------- scrape


def explain_readings(database_url: str) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE of each statement the readings run (bot/metrics/readings.py), compiled
    for PostgreSQL with its parameters inlined."""
    import psycopg
    from sqlalchemy.dialects import postgresql

    from bot.clock import utcnow
    from bot.metrics import readings

    now = utcnow()
    statements = {"figures (one union)": readings._figures_statement().params(since=now - readings.FAILED_WINDOW,
                                                                              now=now),
                  "final statuses, estimated": readings._ESTIMATE.bindparams(name=readings.MESSAGE_STATISTICS),
                  "final statuses, counted (not run beyond 20,000 rows)": readings._messages_statement(live=False)}
    plans = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name, statement in statements.items():
            sql = str(statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            for _ in range(3):  # the last run: a warm cache, as scrapes every 15 s have
                plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql).fetchone()[0][0]
            nodes = []

            def walk(node: dict[str, Any]) -> None:
                nodes.append(node["Node Type"] + (f" on {node['Index Name']}" if "Index Name" in node else "")
                             + (f" on {node['Relation Name']}" if "Relation Name" in node and "Index Name" not in node
                                else ""))
                for child in node.get("Plans", []):
                    walk(child)

            walk(plan["Plan"])
            plans.append({"statement": name, "ms": round(plan["Execution Time"], 2),
                          "planning_ms": round(plan["Planning Time"], 2), "plan": list(dict.fromkeys(nodes))})
            log(f"  {name}: {plan['Execution Time']:.2f} ms (planning {plan['Planning Time']:.2f} ms)  "
                f"{', '.join(dict.fromkeys(nodes))}")
    return plans


def scrape(database_url: str, redis_url: str, scrapes: int, workdir: Path) -> dict[str, Any]:
    port = web_cpu.free_port()
    env = {**web_cpu.bench_env(ROOT, database_url, redis_url, f"http://127.0.0.1:{port}"),
           "METRICS_TOKEN": METRICS_TOKEN}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = web_cpu.procfile_web(ROOT)
    wall, readings_seconds = [], []
    load_before = os.getloadavg()
    with web_cpu.gunicorn(ROOT, env, command, port, workdir) as proc:
        for i in range(scrapes + 10):
            if i == 10:  # CPU from /proc, as bench/web_cpu.py counts it: robust to a busy machine
                backends = web_cpu.postgres_backends(database_url)
                web_before = web_cpu.group_cpu(proc.pid)
                pg_before = {pid: web_cpu.cpu_seconds(pid) for pid in backends}
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            started = time.perf_counter()
            connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            response = connection.getresponse()
            body = response.read().decode()
            took = time.perf_counter() - started
            connection.close()
            if response.status != 200:
                raise SystemExit(f"/metrics answered {response.status}: {body[:500]}")
            if i >= 10:  # the first ones warm both workers (imports, connections)
                wall.append(took)
                readings_seconds.append(next(float(line.split()[-1]) for line in body.splitlines()
                                             if line.startswith("bot_readings_duration_seconds ")))
            time.sleep(0.05)
        web_after = web_cpu.group_cpu(proc.pid)
        pg_after = {pid: web_cpu.cpu_seconds(pid) for pid in web_cpu.postgres_backends(database_url)}
    web = sum(web_after.values()) - sum(web_before.get(pid, 0.0) for pid in web_after)
    pg = sum(pg_after.values()) - sum(pg_before.get(pid, 0.0) for pid in pg_after)
    return {"scrapes": scrapes, "bytes": len(body), "http": percentiles(wall),
            "readings": percentiles(readings_seconds),
            "cpu_ms_per_scrape": {"web": round(1000 * web / scrapes, 2), "postgres": round(1000 * pg / scrapes, 2)},
            "load_average": {"before": [round(x, 1) for x in load_before],
                             "after": [round(x, 1) for x in os.getloadavg()]}}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"p50_ms": round(1000 * statistics.median(ordered), 2),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "max_ms": round(1000 * ordered[-1], 2)}


# ----------------------------------------------------------------------------- throughput


def build_requests(operation: str, start: int, count: int, public_base: str) -> list[tuple[str, str, str, str]]:
    """(path, content type, authorization-or-signature header line, body) per request."""
    requests = []
    for i in range(start, start + count):
        if operation == "notify":
            body = json.dumps({"to": web_cpu.phone(201, i % 30_000), "body": f"Your order {i} shipped"})
            requests.append(("/notify", "application/json", f"Authorization: Bearer {web_cpu.API_TOKEN}", body))
        else:
            form = web_cpu.inbound_form(web_cpu.phone(203, i % 60_000))
            signature = web_cpu.sign(public_base + "/twilio/webhook", form)
            requests.append(("/twilio/webhook", "application/x-www-form-urlencoded",
                             f"X-Twilio-Signature: {signature}", urlencode(form)))
    return requests


def _client(port: int, requests: list[tuple[str, str, str, str]], deadline: float, results: list[int]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    done = errors = 0
    for path, content_type, header, body in requests:
        if time.monotonic() >= deadline:
            break
        name, _, value = header.partition(": ")
        connection.request("POST", path, body=body.encode(), headers={"Content-Type": content_type, name: value})
        response = connection.getresponse()
        response.read()
        if response.status >= 300:
            errors += 1
        done += 1
    connection.close()
    results.append(done)
    results.append(-errors)


def _load_process(port: int, requests: list[tuple[str, str, str, str]], clients: int, duration: float,
                  queue: Any) -> None:
    deadline = time.monotonic() + duration
    results: list[int] = []
    threads = [threading.Thread(target=_client, args=(port, requests[k::clients], deadline, results))
               for k in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    queue.put({"requests": sum(r for r in results if r > 0), "errors": -sum(r for r in results if r < 0),
               "seconds": elapsed})


def load(port: int, requests: list[tuple[str, str, str, str]], clients: int, duration: float) -> dict[str, Any]:
    """`clients` keep-alive connections for `duration` s, from two load processes (one core of
    Python threads cannot keep up with two gunicorn workers)."""
    queue: Any = multiprocessing.Queue()
    half = clients // 2
    processes = [multiprocessing.Process(target=_load_process, args=(port, part, n, duration, queue))
                 for part, n in ((requests[0::2], half), (requests[1::2], clients - half))]
    for process in processes:
        process.start()
    figures = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    total = sum(f["requests"] for f in figures)
    seconds = max(f["seconds"] for f in figures)
    return {"requests": total, "errors": sum(f["errors"] for f in figures), "per_second": round(total / seconds, 1)}


def seed_once(database_url: str) -> None:
    """The contacts /notify writes to (bench/web_cpu.py's group 201): opted in, inside the window."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO contacts (phone, wa_id, consent, email_consent, last_inbound_at, created_at, updated_at)
            SELECT p.phone, ltrim(p.phone, '+'), 'opted_in', 'unknown', now() at time zone 'utc',
                   now() at time zone 'utc', now() at time zone 'utc'
            FROM unnest(%s::text[]) AS p(phone)
            ON CONFLICT (phone) DO UPDATE SET last_inbound_at = excluded.last_inbound_at, consent = 'opted_in'""",
                     [[web_cpu.phone(201, i) for i in range(30_000)]])


def throughput(database_url: str, redis_url: str, rounds: int, duration: float, clients: int,
               workdir: Path) -> dict[str, Any]:
    seed_once(database_url)
    results: dict[str, Any] = {}
    command = web_cpu.procfile_web(ROOT)
    offset = 0
    for operation in ("webhook", "notify"):
        rounds_by_mode: dict[str, list[float]] = {"on": [], "off": []}
        cpu_by_mode: dict[str, list[float]] = {"on": [], "off": []}
        for number in range(rounds):
            for mode in (("on", "off") if number % 2 == 0 else ("off", "on")):
                port = web_cpu.free_port()
                public_base = f"http://127.0.0.1:{port}"
                env = web_cpu.bench_env(ROOT, database_url, redis_url, public_base)
                env.pop("PROMETHEUS_MULTIPROC_DIR", None)
                if mode == "on":
                    env["METRICS_TOKEN"] = METRICS_TOKEN
                count = 40_000
                requests = build_requests(operation, offset, count, public_base)
                offset += count
                with web_cpu.gunicorn(ROOT, env, command, port, workdir) as proc:
                    load(port, requests[:2000], clients, 2)  # warm both workers
                    before = web_cpu.group_cpu(proc.pid)
                    figures = load(port, requests[2000:], clients, duration)
                    after = web_cpu.group_cpu(proc.pid)
                # The web's CPU per request from /proc: steadier than the rate on a shared machine.
                cpu = sum(after.values()) - sum(before.get(pid, 0.0) for pid in after)
                cpu_by_mode[mode].append(round(1000 * cpu / max(figures["requests"], 1), 3))
                if figures["errors"]:
                    raise SystemExit(f"{operation} {mode}: {figures['errors']} errors")
                rounds_by_mode[mode].append(figures["per_second"])
                log(f"{operation} metrics {mode}: {figures['per_second']}/s ({figures['requests']} requests, "
                    f"{cpu_by_mode[mode][-1]} ms web CPU each, load {os.getloadavg()[0]:.1f})")
                web_cpu.flush_queue(redis_url)
        on, off = statistics.median(rounds_by_mode["on"]), statistics.median(rounds_by_mode["off"])
        cpu_on, cpu_off = statistics.median(cpu_by_mode["on"]), statistics.median(cpu_by_mode["off"])
        results[operation] = {"on_per_second": rounds_by_mode["on"], "off_per_second": rounds_by_mode["off"],
                              "median_on": on, "median_off": off, "ratio": round(on / off, 3),
                              "web_cpu_ms_on": cpu_by_mode["on"], "web_cpu_ms_off": cpu_by_mode["off"],
                              "cpu_ratio_off_over_on": round(cpu_off / cpu_on, 3)}
        log(f"{operation}: throughput on/off = {on / off:.3f}; CPU per request off/on = {cpu_off / cpu_on:.3f}")
    return results


def interleaved(rounds: int, batch: int) -> dict[str, Any]:
    """In one process, two apps on the same database and Redis, one with metrics on and one off,
    taking turns batch by batch: CPU per request (`time.process_time`) of each, so the machine's
    other load falls on both alike. Requests through Flask's test client, the request histogram
    in multiprocess mode as under gunicorn. Run in a subprocess (`_interleaved`)."""
    import logging

    from bot import create_app
    from bot.delivery.queue import huey

    logging.disable(logging.WARNING)
    public_base = "https://bench.example.test"
    apps = {mode: create_app({"TWILIO_WEBHOOK_URL": public_base + "/twilio/webhook",
                              **({"METRICS_TOKEN": METRICS_TOKEN} if mode == "on" else {})}) for mode in ("on", "off")}
    clients = {mode: app.test_client() for mode, app in apps.items()}
    operations = {"webhook": "webhook", "notify": "notify_to"}
    results: dict[str, Any] = {}
    counter = 100_000
    for name, operation in operations.items():
        cpu: dict[str, list[float]] = {"on": [], "off": []}
        for number in range(rounds + 1):
            for mode in (("on", "off") if number % 2 == 0 else ("off", "on")):
                client = clients[mode]
                started = time.process_time()
                for _ in range(batch):
                    counter += 1
                    path, content_type, headers, body = web_cpu.request_for(operation, counter % 30_000 if name == "notify"
                                                                           else counter, public_base)
                    response = client.post(path, data=body, content_type=content_type, headers=headers,
                                           base_url=public_base)
                    assert response.status_code in (200, 202), response.get_data(as_text=True)[:300]
                if number:  # the first round warms both apps
                    cpu[mode].append(1000 * (time.process_time() - started) / batch)
            huey.flush()
        on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
        results[name] = {"cpu_ms_on": round(on, 3), "cpu_ms_off": round(off, 3), "ratio_off_over_on": round(off / on, 3),
                         "rounds": rounds, "batch": batch}
    return results


def per_request_cost(n: int) -> dict[str, float]:
    """Microseconds per call of what a request and a send pay with metrics on: the request
    timing hooks' observation and a counter's increment (no I/O: the flush is a thread's)."""
    from bot.metrics import counters, http_timing

    counters.configure(None, 3600)
    child = http_timing.REQUEST_DURATION.labels("/notify", "POST", "202")
    started = time.perf_counter()
    for _ in range(n):
        child.observe(0.004)
    observe = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for _ in range(n):
        counters.send_outcome("whatsapp", "accepted")
    count = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for _ in range(n):
        counters._observe(counters.SEND_DURATION, (("channel", "whatsapp"),), 0.2)
    histogram = (time.perf_counter() - started) / n
    return {"request_histogram_observe_us": round(1e6 * observe, 2), "counter_increment_us": round(1e6 * count, 2),
            "shared_histogram_observe_us": round(1e6 * histogram, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["fill", "scrape", "throughput", "interleaved", "cost", "all", "_interleaved"])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/h18m"))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/3"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", default=str(BENCH / "metrics_cost.json"))
    parser.add_argument("--batch", type=int, default=100, help="requests per turn, interleaved")
    args = parser.parse_args()
    if args.what == "_interleaved":
        print("RESULT " + json.dumps(interleaved(args.rounds, args.batch)))
        return
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-metrics-{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    def save() -> None:  # after each part: a long run that fails late keeps what it measured
        out.write_text(json.dumps(results, indent=1) + "\n")

    if args.what in ("cost", "all"):
        results["per_call"] = per_request_cost(200_000)
        log(json.dumps(results["per_call"]))
    if args.what in ("fill", "all"):
        results["fill"] = fill(args.database_url, args.redis_url, args.rows)
        save()
    if args.what in ("scrape", "all"):
        results["explain"] = explain_readings(args.database_url)
        results["scrape"] = scrape(args.database_url, args.redis_url, args.scrapes, workdir)
        log(json.dumps(results["scrape"]))
        save()
    if args.what in ("interleaved", "all"):
        import subprocess

        seed_once(args.database_url)
        directory = workdir / "prometheus"
        directory.mkdir()
        env = {**web_cpu.bench_env(ROOT, args.database_url, args.redis_url, "http://127.0.0.1"),
               "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        done = subprocess.run([sys.executable, __file__, "_interleaved", "--rounds", str(args.rounds * 10),
                               "--batch", str(args.batch)], env=env, cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
        results["interleaved"] = json.loads(line[7:])
        log(json.dumps(results["interleaved"]))
        save()
    if args.what in ("throughput", "all"):
        results["throughput"] = throughput(args.database_url, args.redis_url, args.rounds, args.duration,
                                           args.clients, workdir)
    save()
    log(f"results in {out}; logs in {workdir}")


if __name__ == "__main__":
    main()
