"""Benchmark: how fast the web process answers /notify and /twilio/webhook.

Starts the Procfile's web line (gunicorn) on a temporary SQLite database (or DATABASE_URL /
REDIS_URL if set) with no worker, so only the request path is measured: validate, store,
enqueue, answer. Prints latency percentiles and throughput; see bench/REPORT.md.

    .venv/bin/python bench/http_latency.py [--requests 500] [--concurrency 4]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.devtools.simulator import sign  # noqa: E402

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-auth-token"
API_TOKEN = "bench-api-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return f"p50 {pick(0.50):6.1f} ms   p95 {pick(0.95):6.1f} ms   p99 {pick(0.99):6.1f} ms   max {ordered[-1]*1000:6.1f} ms"


def run(label: str, count: int, concurrency: int, make_request) -> None:
    session = requests.Session()
    for _ in range(10):  # warm up connections and caches
        make_request(session)

    def timed(_: int) -> float:
        started = time.perf_counter()
        make_request(session)
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(timed, range(count)))
    elapsed = time.perf_counter() - started
    print(f"{label:<28} {count} requests, {concurrency} clients: {count / elapsed:7.1f} req/s   {percentiles(samples)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    webhook = base + "/twilio/webhook"
    env = {**os.environ, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
           "TWILIO_WHATSAPP_NUMBER": "whatsapp:+14155238886", "NOTIFY_API_TOKEN": API_TOKEN,
           "TWILIO_WEBHOOK_URL": webhook, "INSTANCE_PATH": tmp, "PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    procfile = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if ":" in line)
    subprocess.run(["bash", "-c", procfile["release"]], env=env, cwd=tmp, check=True, capture_output=True)
    web = subprocess.Popen(["bash", "-c", "exec " + procfile["web"].strip()], env=env, cwd=tmp,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(100):
            try:
                if requests.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        print(f"web: gunicorn ({os.environ.get('WEB_CONCURRENCY', '2')} processes), "
              f"database {'DATABASE_URL' if os.environ.get('DATABASE_URL') else 'SQLite'}, "
              f"queue {'Redis' if os.environ.get('REDIS_URL') else 'SQLite'}")
        auth = {"Authorization": f"Bearer {API_TOKEN}"}

        def inbound(session: requests.Session) -> None:
            sid = "SM" + uuid.uuid4().hex
            form = {"MessageSid": sid, "AccountSid": ACCOUNT_SID, "From": "whatsapp:+15551230000",
                    "To": "whatsapp:+14155238886", "Body": "hello", "NumMedia": "0", "ProfileName": "Bench"}
            r = session.post(webhook, data=form, headers={"X-Twilio-Signature": sign(AUTH_TOKEN, webhook, form)})
            assert r.status_code == 200, r.text

        def notify(session: requests.Session) -> None:
            r = session.post(base + "/notify", json={"to": "+15551230000", "body": "Your order shipped"},
                             headers=auth)
            assert r.status_code == 202, r.text

        def status(session: requests.Session) -> None:
            form = {"MessageSid": "SM" + uuid.uuid4().hex, "MessageStatus": "delivered", "AccountSid": ACCOUNT_SID}
            r = session.post(webhook, data=form, headers={"X-Twilio-Signature": sign(AUTH_TOKEN, webhook, form)})
            assert r.status_code == 200, r.text

        run("webhook: inbound message", args.requests, args.concurrency, inbound)
        run("POST /notify", args.requests, args.concurrency, notify)
        run("webhook: status callback", args.requests, args.concurrency, status)
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(10)


if __name__ == "__main__":
    main()
