"""CPU of the web process per request, counted, not estimated (issue 17).

Three measurements, each for one or more source trees (this branch and main in a second
worktree, in the same run, so every ratio compares like with like):

* **in-process** (`inprocess`): `create_app` on PostgreSQL + Redis, requests through Flask's test
  client; per request: CPU (`time.process_time`), SQL statements (a `before_cursor_execute`
  listener) and commits (the engine's `commit` event). With `--profile DIR`, a cProfile run with
  `time.process_time` as its clock (wall-clock samples lie about CPU) per operation.
* **gunicorn** (`load`): the Procfile's web line (or another shape: worker class, processes,
  threads) serving the tree's `wsgi:app`, or bench/bare_app.py's bare signed endpoint on the same
  line, driven by wrk from a second process for a fixed time at a fixed number of connections.
  CPU from /proc for the web's process group (master and workers), for the PostgreSQL backends of
  the benchmark's database and for wrk, divided by the requests answered.
* **shapes** (`shapes`): `load` for a list of gunicorn shapes, for the Procfile's defaults.

The operations: `notify_to` (POST /notify {"to", "body"}), `notify_user` (POST /notify
{"user_id", "body"}), `webhook` (a signed inbound message, each from a different contact, each a
new MessageSid), `callback` (a signed status callback: sent, delivered, read for each of
CALLBACK_MESSAGES seeded outbound messages, each (SID, status) once) and `bare` (bench/bare_app.py: verify the signature, answer empty TwiML). Every
contact exists already, opted in and inside the 24-hour window (a notification's usual case).

No worker runs: what is measured is the web alone (the enqueued tasks wait in Redis and are
flushed). Each `callback` run starts from the same seeded messages (`reset_callbacks`), and a
gunicorn run's warm-up posts requests of its own, so no measured request is a repeat. Every web
process's RSS is read from /proc at the end of each gunicorn run. Reproduce (bench/THROUGHPUT.md,
"The web's hot path"):

    git worktree add /tmp/base main
    .venv/bin/python bench/web_cpu.py all --tree . --tree /tmp/base --database-url postgresql://...
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
ACCOUNT_SID = "AC" + "b3" * 16
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
API_TOKEN = "bench-api-token"
SENDER = "whatsapp:+14155238886"
OPERATIONS = ("notify_to", "notify_user", "webhook", "callback")
#: The status callbacks of each seeded message, in the order Twilio posts them.
CALLBACK_STATUSES = ("sent", "delivered", "read")
#: Seeded outbound messages (accepted, with a SID) that the status callbacks name.
CALLBACK_MESSAGES = 25_000
TICKS = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def phone(group: int, i: int) -> str:
    """A distinct, valid E.164 number per (group, i): +1 202 55x xxxx style, never a real one."""
    return f"+1{group:03d}555{i:04d}"[:12] if i < 10_000 else f"+1{group:03d}5{i:06d}"


# ----------------------------------------------------------------------------- requests


def sign(url: str, form: dict[str, str]) -> str:
    """X-Twilio-Signature as Twilio computes it (HMAC-SHA1 over the URL and the sorted fields)."""
    import base64
    import hashlib
    import hmac

    data = url + "".join(key + form[key] for key in sorted(form))
    return base64.b64encode(hmac.new(AUTH_TOKEN.encode(), data.encode(), hashlib.sha1).digest()).decode()


def inbound_form(from_: str) -> dict[str, str]:
    sid = "SM" + uuid.uuid4().hex
    return {"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": ACCOUNT_SID,
            "From": "whatsapp:" + from_, "To": SENDER, "Body": "hello", "NumMedia": "0", "NumSegments": "1",
            "SmsStatus": "received", "ApiVersion": "2010-04-01", "WaId": from_.lstrip("+"),
            "ProfileName": "Bench", "MessageType": "text"}


def callback_sid(i: int) -> str:
    """The Twilio SID of the i-th seeded outbound message."""
    return f"SM{i:032x}"


def callback_form(i: int) -> dict[str, str]:
    """The i-th status callback: message i // 3, its sent, delivered or read."""
    sid = callback_sid(i // len(CALLBACK_STATUSES) % CALLBACK_MESSAGES)
    status = CALLBACK_STATUSES[i % len(CALLBACK_STATUSES)]
    return {"MessageSid": sid, "SmsSid": sid, "AccountSid": ACCOUNT_SID, "From": SENDER,
            "To": "whatsapp:" + phone(204, i // len(CALLBACK_STATUSES)), "MessageStatus": status,
            "SmsStatus": status, "ApiVersion": "2010-04-01", "ChannelPrefix": "whatsapp"}


def request_for(operation: str, i: int, public_base: str) -> tuple[str, str, dict[str, str], str]:
    """(path, content type, extra headers, body) of the i-th request of an operation."""
    from urllib.parse import urlencode

    if operation == "notify_to":
        body = json.dumps({"to": phone(201, i), "body": f"Your order {i} shipped"})
        return "/notify", "application/json", {"Authorization": f"Bearer {API_TOKEN}"}, body
    if operation == "notify_user":
        body = json.dumps({"user_id": f"bench-user-{i}", "body": f"Your order {i} shipped"})
        return "/notify", "application/json", {"Authorization": f"Bearer {API_TOKEN}"}, body
    if operation in ("webhook", "bare", "callback"):
        form = callback_form(i) if operation == "callback" else inbound_form(phone(203, i))
        signature = sign(public_base + "/twilio/webhook", form)
        return "/twilio/webhook", "application/x-www-form-urlencoded", {"X-Twilio-Signature": signature}, urlencode(form)
    raise ValueError(operation)


# ----------------------------------------------------------------------------- database


def engine_url(database_url: str) -> str:
    return "postgresql+psycopg://" + database_url.split("://", 1)[1] if database_url.startswith("postgres") else database_url


def recreate_schema(tree: Path, env: dict[str, str]) -> None:
    """Drop every table and run the tree's own migrations (what the Procfile's release line does)."""
    code = ("import sqlalchemy as sa\n"
            "from flask_migrate import upgrade\n"
            "from bot import create_app\n"
            "from bot.extensions import db\n"
            "app = create_app({\"TESTING\": True})\n"
            "with app.app_context():\n"
            "    m = sa.MetaData(); m.reflect(bind=db.engine); m.drop_all(bind=db.engine); db.session.commit()\n"
            "    upgrade()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit("schema: " + done.stderr[-3000:])


def seed(database_url: str, count: int) -> None:
    """Contacts for every operation: opted in, inside the 24-hour window; `notify_user`'s with a
    backend user id; for `callback`, one accepted outbound message with a SID per contact of
    group 204. Written with plain SQL in one statement per table (no app code involved)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO contacts (phone, user_id, wa_id, consent, email_consent, last_inbound_at, created_at, updated_at)
            SELECT p.phone, p.user_id, ltrim(p.phone, '+'), 'opted_in', 'unknown',
                   now() at time zone 'utc' - interval '1 minute', now() at time zone 'utc', now() at time zone 'utc'
            FROM unnest(%s::text[], %s::text[]) AS p(phone, user_id)""",
                     [[phone(g, i) for g in (201, 202, 203, 204) for i in range(count)],
                      [f"bench-user-{i}" if g == 202 else None for g in (201, 202, 203, 204) for i in range(count)]])
        conn.execute("""
            INSERT INTO messages (id, direction, kind, contact_id, channel, body, twilio_sid, status, status_rank,
                                  attempts, created_at, updated_at, sent_at)
            SELECT md5(m.sid), 'outbound', 'notification', c.id, 'whatsapp', 'Your order shipped', m.sid,
                   'accepted', 2, 1, now() at time zone 'utc', now() at time zone 'utc', now() at time zone 'utc'
            FROM unnest(%s::text[], %s::text[]) AS m(sid, phone) JOIN contacts c ON c.phone = m.phone""",
                     [[callback_sid(i) for i in range(CALLBACK_MESSAGES)],
                      [phone(204, i) for i in range(CALLBACK_MESSAGES)]])
        conn.execute("ANALYZE")


def reset_callbacks(database_url: str) -> None:
    """The seeded messages back to `accepted` with no status event and no event, so every
    `callback` run posts each (SID, status) for the first time (a repeat would measure the
    deduplication instead)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        sids = [callback_sid(i) for i in range(CALLBACK_MESSAGES)]
        conn.execute("DELETE FROM events WHERE message_id IN (SELECT id FROM messages WHERE twilio_sid = ANY(%s))",
                     [sids])
        conn.execute("DELETE FROM status_events WHERE twilio_sid = ANY(%s)", [sids])
        conn.execute("UPDATE messages SET status = 'accepted', status_rank = 2, error_code = NULL, "
                     "error_message = NULL WHERE twilio_sid = ANY(%s)", [sids])
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("VACUUM ANALYZE status_events")
        conn.execute("VACUUM ANALYZE events")


def bench_env(tree: Path, database_url: str, redis_url: str, public_base: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWILIO_", "DATABASE_URL", "REDIS_URL", "WEB_CONCURRENCY", "PYTHONPATH"))}
    env.update({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_WHATSAPP_NUMBER": SENDER,
                "TWILIO_WEBHOOK_URL": public_base + "/twilio/webhook", "TWILIO_API_URL": "http://127.0.0.1:9",
                "NOTIFY_API_TOKEN": API_TOKEN, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
                "QUEUE_NAME": "bench-web-" + uuid.uuid4().hex[:8], "BENCH_PUBLIC_BASE": public_base,
                # The tree's own code, whichever venv runs it (its editable install may point elsewhere).
                "PYTHONPATH": str(tree), "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]})
    return env


# ----------------------------------------------------------------------------- in-process


def inprocess(n: int, profile_dir: str | None) -> dict[str, Any]:
    """Run in a subprocess whose PYTHONPATH is the tree: per operation, CPU, statements and
    commits per request through Flask's test client (its own CPU included)."""
    import logging

    import sqlalchemy as sa

    import bot
    from bot import create_app
    from bot.delivery.queue import huey
    from bot.extensions import db

    logging.disable(logging.WARNING)
    public_base = "https://bench.example.test"
    app = create_app({"TWILIO_WEBHOOK_URL": public_base + "/twilio/webhook"})
    client = app.test_client()
    counts = {"statements": 0, "commits": 0}
    results: dict[str, Any] = {"code": str(Path(bot.__file__).parent.parent)}
    with app.app_context():
        sa.event.listen(db.engine, "before_cursor_execute",
                        lambda *a: counts.__setitem__("statements", counts["statements"] + 1))
        sa.event.listen(db.engine, "commit", lambda *a: counts.__setitem__("commits", counts["commits"] + 1))

    def post(operation: str, i: int) -> None:
        path, content_type, headers, body = request_for(operation, i, public_base)
        response = client.post(path, data=body, content_type=content_type, headers=headers, base_url=public_base)
        if response.status_code not in (200, 202):
            raise SystemExit(f"{operation} #{i}: {response.status_code} {response.get_data(as_text=True)[:300]}")

    warm = 30
    for operation in OPERATIONS:
        for i in range(warm):
            post(operation, i)
        before = dict(counts)
        cpu = time.process_time()
        for i in range(warm, warm + n):
            post(operation, i)
        cpu = time.process_time() - cpu
        results[operation] = {"requests": n, "cpu_ms": round(1000 * cpu / n, 3),
                              "statements": round((counts["statements"] - before["statements"]) / n, 2),
                              "commits": round((counts["commits"] - before["commits"]) / n, 2)}
        if profile_dir:
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            for i in range(warm + n, warm + 2 * n):
                post(operation, i)
            profiler.disable()
            out = Path(profile_dir)
            out.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(out / f"{operation}.prof")
            with open(out / f"{operation}.txt", "w") as text:
                stats = pstats.Stats(profiler, stream=text).strip_dirs()
                text.write(f"# {operation}: {n} requests, cProfile with time.process_time\n")
                stats.sort_stats("tottime").print_stats(35)
                stats.sort_stats("cumulative").print_stats(60)
    huey.flush()
    return results


# ----------------------------------------------------------------------------- gunicorn + wrk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_web(tree: Path) -> str:
    for line in (tree / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit("no web line in the Procfile")


def web_command(tree: Path, shape: str | None, app_spec: str = "wsgi:app") -> str:
    """The Procfile's web line with its defaults; `shape` ("gthread:2x4", "sync:3") replaces its
    worker class, processes and threads."""
    line = procfile_web(tree).replace("wsgi:app", app_spec)
    if shape:
        kind, _, size = shape.partition(":")
        processes, _, threads = size.partition("x")
        line = re.sub(r"--workers \S+", f"--workers {processes}", line)
        line = re.sub(r"\s--threads \S+", "", line)
        line = re.sub(r"\s--worker-class \S+", "", line)
        line += f" --worker-class {kind}" + (f" --threads {threads}" if threads else "")
    return line


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    return 0.0


def group_cpu(pgid: int) -> dict[int, float]:
    """CPU seconds of every process in a process group (gunicorn's master and workers)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    return found


def postgres_backends(database_url: str) -> list[int]:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        name = conn.info.dbname
        return [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [name])]


@contextlib.contextmanager
def gunicorn(tree: Path, env: dict[str, str], command: str, port: int, workdir: Path) -> Iterator[subprocess.Popen]:
    env = {**env, "PORT": str(port)}
    with open(workdir / f"web-{port}.log", "w") as out:
        proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=tree, env=env, stdout=out, stderr=out,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start: {(workdir / f'web-{port}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


WRK_SCRIPT = r"""
-- Cycles through pre-built requests (signed webhooks need one signature each): thread k takes
-- lines k, k+T, k+2T... of the file, so no two threads send the same request.
local counter, threads = 0, {}
function setup(thread) thread:set("id", counter); counter = counter + 1; table.insert(threads, thread) end
function init(args)
  requests, i = {}, 0
  local n, step = 0, tonumber(args[2])
  for line in io.lines(args[1]) do
    if n % step == id then
      local path, ctype, hname, hvalue, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      local headers = {["Content-Type"] = ctype}
      headers[hname] = hvalue
      table.insert(requests, wrk.format("POST", path, headers, body))
    end
    n = n + 1
  end
end
function request() i = i % #requests + 1; return requests[i] end
function response(status, headers, body) if status >= 300 then bad = (bad or 0) + 1 end end
function done(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"p50_ms\": %.2f, \"p99_ms\": %.2f, \"errors\": %d}\n",
    summary.requests, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
"""


def write_requests(path: Path, operation: str, start: int, count: int, public_base: str) -> None:
    with open(path, "w") as out:
        for i in range(start, start + count):
            req_path, ctype, headers, body = request_for(operation, i, public_base)
            (name, value), = headers.items()
            out.write(f"{req_path}\t{ctype}\t{name}\t{value}\t{body}\n")


def run_wrk(base: str, script: Path, requests_file: Path, threads: int, connections: int,
            duration: float) -> dict[str, Any]:
    """wrk's figures: requests answered, latency percentiles, errors."""
    proc = subprocess.Popen(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{int(duration)}s", "--timeout",
                             "10s", "-s", str(script), base, "--", str(requests_file), str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate()
    figures = next((json.loads(line[5:]) for line in out.splitlines() if line.startswith("JSON ")), None)
    if figures is None:
        raise SystemExit("wrk: " + out[-2000:])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    return figures


def load(tree: Path, operation: str, shape: str | None, connections: int, duration: float, database_url: str,
         redis_url: str, workdir: Path) -> dict[str, Any]:
    """One gunicorn shape, one operation, `connections` clients for `duration` seconds."""
    import resource

    port = free_port()
    public_base = f"http://127.0.0.1:{port}"
    env = bench_env(tree, database_url, redis_url, public_base)
    bare = operation == "bare"
    command = web_command(tree, shape, "bare_app:app" if bare else "wsgi:app")
    cwd = BENCH if bare else tree
    script = workdir / "wrk.lua"
    script.write_text(WRK_SCRIPT)
    requests_file = workdir / f"{operation}-{port}.tsv"
    # Enough distinct requests for the run (repeats would measure the deduplication instead).
    write_requests(requests_file, operation, 0, 30_000 if operation.startswith("notify") else 60_000, public_base)
    # The warm-up's own requests (later contacts, later messages): the measured run starts at the
    # file's first line again, and must not repeat what the warm-up already stored.
    warm_file = workdir / f"{operation}-{port}-warm.tsv"
    write_requests(warm_file, operation, 60_000, 10_000, public_base)
    threads = 2
    if operation == "callback":
        reset_callbacks(database_url)
    with gunicorn(cwd, env, command, port, workdir) as proc:
        # Warm every worker: until they answer at a steady rate (a worker still importing the
        # app under a loaded machine would spend its boot CPU inside the measured window).
        for _ in range(6):
            if run_wrk(public_base, script, warm_file, threads, connections, 2)["requests"] >= 300:
                break
        time.sleep(0.5)
        rss_idle = {pid: rss_mib(pid) for pid in group_cpu(proc.pid)}
        backends = [] if bare else postgres_backends(database_url)
        web_before, pg_before = group_cpu(proc.pid), {pid: cpu_seconds(pid) for pid in backends}
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        figures = run_wrk(public_base, script, requests_file, threads, connections, duration)
        elapsed = time.monotonic() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        web_after = group_cpu(proc.pid)
        pg_after = {pid: cpu_seconds(pid) for pid in (postgres_backends(database_url) if not bare else [])}
        rss = {pid: rss_mib(pid) for pid in web_after}
        # VmHWM: the most each process was resident since it started (warm-up and run);
        # Pss: its resident pages with each shared one divided among the processes sharing it.
        rss_peak = {pid: rss_mib(pid, "VmHWM") for pid in web_after}
        pss = {pid: pss_mib(pid) for pid in web_after}
    answered = max(figures["requests"], 1)
    web = sum(web_after.values()) - sum(web_before.get(pid, 0.0) for pid in web_after)
    pg = sum(pg_after.values()) - sum(pg_before.get(pid, 0.0) for pid in pg_after)
    # wrk's CPU: the children's rusage grows by exactly the wrk run that ended (the warm-up was before).
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    return {"operation": operation, "shape": shape or "procfile", "command": command, "connections": connections,
            "seconds": round(elapsed, 2), "requests": figures["requests"], "per_second": round(figures["requests"] / elapsed, 1),
            "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"], "errors": figures["errors"],
            "non_2xx": figures["non_2xx"], "web_cpu_ms": round(1000 * web / answered, 3),
            "postgres_cpu_ms": round(1000 * pg / answered, 3), "wrk_cpu_ms": round(1000 * wrk_cpu / answered, 3),
            "web_cores": round(web / elapsed, 2), "rss_mib": rss, "rss_idle_mib": rss_idle,
            "rss_peak_mib": rss_peak, "pss_mib": pss}


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident memory in MiB (`field`: VmRSS now, VmHWM its peak)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def pss_mib(pid: int) -> float | None:
    """A process's proportional set size in MiB (shared pages divided among their sharers)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


# ----------------------------------------------------------------------------- the run


def flush_queue(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("huey.*bench-web-*"):
        client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["inprocess", "load", "shapes", "all", "_inprocess"])
    parser.add_argument("--tree", action="append", default=[], help="a source tree (repeat: this branch, main...)")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test_lean"))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
    parser.add_argument("-n", type=int, default=300, help="requests per operation, in-process")
    parser.add_argument("--profile", help="directory for the cProfile output (in-process)")
    parser.add_argument("--operations", default="notify_to,notify_user,webhook,callback,bare")
    parser.add_argument("--shapes", default="", help="comma-separated gunicorn shapes, e.g. gthread:2x4,sync:4")
    parser.add_argument("--connections", default="16", help="comma-separated wrk connection counts")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, the trees interleaved")
    parser.add_argument("--out", default=str(BENCH / "web_cpu.json"))
    args = parser.parse_args()

    if args.what == "_inprocess":
        print("RESULT " + json.dumps(inprocess(args.n, args.profile)))
        return
    trees = [Path(t).resolve() for t in args.tree] or [BENCH.parent]
    if not shutil.which("wrk") and args.what != "inprocess":
        raise SystemExit("wrk is needed for the gunicorn runs (Debian: apt-get install -y wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-web-cpu-"))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "runs": []}
    schema_of: tuple[str, ...] | None = None
    # Rounds interleave the trees (A, B, A, B...): on a shared machine the load of the moment
    # weighs on both alike, and the lowest CPU per request of each is the least disturbed.
    for round_ in range(args.rounds):
        for tree in trees:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                                    text=True).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "bot", "Procfile", "wsgi.py"], cwd=tree,
                                        capture_output=True, text=True).stdout.strip())
            label = f"{tree.name}@{commit}" + ("+changes" if dirty else "")
            env = bench_env(tree, args.database_url, args.redis_url, "http://127.0.0.1")
            migrations = tuple(sorted(p.name for p in (tree / "bot" / "migrations" / "versions").glob("*.py")))
            if migrations != schema_of:  # the same migrations: the same schema, kept between trees
                log(f"{label}: schema from its own migrations")
                recreate_schema(tree, env)
                seed(args.database_url, 70_000)
                schema_of = migrations
            run: dict[str, Any] = {"tree": str(tree), "label": label, "round": round_}
            if args.what in ("inprocess", "all"):
                log(f"{label}: in-process, {args.n} requests per operation")
                reset_callbacks(args.database_url)
                command = [sys.executable, __file__, "_inprocess", "-n", str(args.n)]
                if args.profile and round_ == 0:
                    command += ["--profile", str(Path(args.profile) / tree.name)]
                done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
                run["inprocess"] = json.loads(line[7:])
                log(json.dumps(run["inprocess"]))
            if args.what in ("load", "all", "shapes"):
                shapes = [s for s in args.shapes.split(",") if s] or [None]
                run["load"] = []
                for shape in shapes:
                    for operation in [o for o in args.operations.split(",") if o]:
                        for connections in [int(c) for c in args.connections.split(",")]:
                            figures = load(tree, operation, shape, connections, args.duration, args.database_url,
                                           args.redis_url, workdir)
                            log(json.dumps({k: v for k, v in figures.items() if k not in ("command", "rss_mib")}))
                            run["load"].append(figures)
                            flush_queue(args.redis_url)
                            # Each run's rows stay; the next inserts new ones (its own message ids).
            results["runs"].append(run)
            flush_queue(args.redis_url)
            Path(args.out).write_text(json.dumps(results, indent=1))  # what is done so far
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"results in {args.out}; logs in {workdir}")


if __name__ == "__main__":
    main()
