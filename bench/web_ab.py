"""What one change to the web's hot path saves, measured in one process (issue 17).

On a machine shared with other work, two trees measured one after the other differ by more than
a small change saves: the CPU a request costs moves with the load of the moment. Here one
process switches between the code as it was (A) and as it is (B) every BLOCK requests, many
times over, so both see the same load; CPU is the process's own clock (`time.process_time`).

A puts back what the third pass replaced (bench/THROUGHPUT.md, "The web's hot path"):
huey's own `RedisPriorityQueue.enqueue` (redis-py's `zadd`) for the held-connection ZADD,
`request.form` for `twilio_form`, and a parse of every number (the cache emptied before each
request). Requests go through Flask's test client (its CPU included, in both). Needs the
database and contacts `bench/web_cpu.py` seeds (run it once first) and REDIS_URL:

    PYTHONPATH=. .venv/bin/python bench/web_ab.py --database-url postgresql://postgres@127.0.0.1:5432/<db> \
        --redis-url redis://127.0.0.1:6379/<n>
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import web_cpu  # noqa: E402  (the requests, the signing and the environment of the main benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--blocks", type=int, default=20, help="blocks per variant and operation")
    parser.add_argument("--block", type=int, default=50, help="requests per block")
    parser.add_argument("--operations", default="webhook,callback,notify_to")
    args = parser.parse_args()
    public_base = "https://bench.example.test"
    tree = Path(__file__).resolve().parent.parent
    os.environ.update(web_cpu.bench_env(tree, args.database_url, args.redis_url, public_base))
    os.environ["TWILIO_WEBHOOK_URL"] = public_base + "/twilio/webhook"
    web_cpu.reset_callbacks(args.database_url)

    from flask import request
    from huey.storage import RedisPriorityQueue

    from bot import create_app
    from bot import phone
    from bot.delivery import queue
    from bot.http import auth, webhook

    logging.disable(logging.WARNING)
    app = create_app({"TWILIO_WEBHOOK_URL": public_base + "/twilio/webhook"})
    client = app.test_client()
    new = {"enqueue": queue.PriorityQueueStorage.enqueue, "form": auth.twilio_form}

    def variant(name: str) -> None:
        old = name == "A"
        queue.PriorityQueueStorage.enqueue = RedisPriorityQueue.enqueue if old else new["enqueue"]
        form = (lambda: request.form) if old else new["form"]
        auth.twilio_form = webhook.twilio_form = form
        phone.CLEAR_CACHE_PER_REQUEST = old

    counter = {"i": 0}

    def post(operation: str) -> None:
        i = counter["i"] = counter["i"] + 1
        if getattr(phone, "CLEAR_CACHE_PER_REQUEST", False):
            phone._normalized.cache_clear()
        path, content_type, headers, body = web_cpu.request_for(operation, i, public_base)
        response = client.post(path, data=body, content_type=content_type, headers=headers, base_url=public_base)
        if response.status_code not in (200, 202):
            raise SystemExit(f"{operation}: {response.status_code} {response.get_data(as_text=True)[:300]}")

    results = {}
    for operation in args.operations.split(","):
        cpu = {"A": 0.0, "B": 0.0}
        for name in "AB":  # warm both
            variant(name)
            for _ in range(args.block):
                post(operation)
        for _ in range(args.blocks):
            for name in "AB":
                variant(name)
                started = time.process_time()
                for _ in range(args.block):
                    post(operation)
                cpu[name] += time.process_time() - started
        n = args.blocks * args.block
        results[operation] = {"requests_each": n, "before_ms": round(1000 * cpu["A"] / n, 3),
                              "after_ms": round(1000 * cpu["B"] / n, 3),
                              "saved_ms": round(1000 * (cpu["A"] - cpu["B"]) / n, 3)}
        print(json.dumps({operation: results[operation]}), flush=True)
    web_cpu.flush_queue(args.redis_url)


if __name__ == "__main__":
    main()
