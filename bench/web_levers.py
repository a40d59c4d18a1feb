"""What each layer around a hot request costs, measured in one process, interleaved (issue 17).

The web's requests are one statement and one commit wrapped in Flask, Flask-SQLAlchemy's
session, SQLAlchemy's Core and psycopg. A profile spreads their CPU over hundreds of functions;
here each layer is run alone and against the layer under it, in blocks that alternate (A B C A B
C ...) so that every variant sees the same load of a shared machine. CPU is the process's own
clock (`time.process_time`). The figures are per operation, in microseconds:

- the statement and its commit through `db.session` (what the hot paths do), on the session's
  connection, on a Core connection (`engine.connect()`), and the psycopg round trips alone:
  BEGIN + statement + COMMIT (what a transaction costs the driver) against the statement in
  autocommit (what one round trip costs);
- an app context alone, and one with Flask-SQLAlchemy's session made and removed;
- a request context pushed and popped (routing, the request object, the teardowns);
- the request timing hooks (`bot.metrics.http_timing`, METRICS_TOKEN set) in multiprocess mode;
- gunicorn's access log line, with and without `bot.gunicorn_logging.MaskingLogger`.

    PYTHONPATH=. .venv/bin/python bench/web_levers.py --database-url postgresql://postgres@127.0.0.1:5432/<db> \\
        --redis-url redis://127.0.0.1:6379/<n>
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import web_cpu  # noqa: E402  (the benchmark's environment)


def interleaved(variants: dict[str, Callable[[], object]], blocks: int, block: int) -> dict[str, float]:
    """Microseconds of this process's CPU per call of each variant, the variants' blocks alternating."""
    for run in variants.values():  # warm: connections made, statements compiled and cached
        for _ in range(block):
            run()
    spent = dict.fromkeys(variants, 0.0)
    for _ in range(blocks):
        for name, run in variants.items():
            started = time.process_time()
            for _ in range(block):
                run()
            spent[name] += time.process_time() - started
    return {name: round(1e6 * seconds / (blocks * block), 1) for name, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--block", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-levers-prom-"))
    os.environ.update(web_cpu.bench_env(Path.cwd(), args.database_url, args.redis_url, "https://bench.example.test"))

    import psycopg
    import sqlalchemy as sa
    from flask import Response
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from bot import create_app
    from bot.extensions import db
    from bot.gunicorn_logging import MaskingLogger
    from bot.metrics import http_timing

    logging.disable(logging.WARNING)
    app = create_app()
    statement = sa.select(sa.literal(1))
    results: dict[str, dict[str, float]] = {}

    def through_session() -> None:
        with app.app_context():
            db.session.execute(statement).scalar()
            db.session.commit()

    def on_session_connection() -> None:
        with app.app_context():
            db.session.connection().execute(statement).scalar()
            db.session.commit()

    def on_core_connection() -> None:
        with app.app_context(), db.engine.connect() as connection:
            connection.execute(statement).scalar()
            connection.commit()

    results["statement_and_commit"] = interleaved(
        {"db.session": through_session, "db.session.connection()": on_session_connection,
         "engine.connect()": on_core_connection}, args.blocks, args.block)
    print(json.dumps(results["statement_and_commit"]), flush=True)

    dsn = args.database_url.replace("postgresql+psycopg://", "postgresql://")
    in_transaction, autocommit = psycopg.connect(dsn), psycopg.connect(dsn, autocommit=True)

    def begin_statement_commit() -> None:
        with in_transaction.cursor() as cursor:
            cursor.execute("SELECT %(a)s::int", {"a": 1})
            cursor.fetchone()
        in_transaction.commit()

    def statement_alone() -> None:
        with autocommit.cursor() as cursor:
            cursor.execute("SELECT %(a)s::int", {"a": 1})
            cursor.fetchone()

    results["psycopg"] = interleaved({"BEGIN + statement + COMMIT": begin_statement_commit,
                                      "statement, autocommit": statement_alone}, args.blocks, args.block)
    print(json.dumps(results["psycopg"]), flush=True)

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/twilio/webhook", "SERVER_NAME": "bench.example.test",
               "SERVER_PORT": "443", "wsgi.url_scheme": "https", "SERVER_PROTOCOL": "HTTP/1.1"}

    def app_context() -> None:
        with app.app_context():
            pass

    def app_context_and_session() -> None:
        with app.app_context():
            db.session.get_bind()

    def request_context() -> None:
        with app.request_context(environ):
            pass

    results["flask"] = interleaved({"app context": app_context, "app context + db.session made and removed":
                                    app_context_and_session, "request context": request_context},
                                   args.blocks, args.block)
    print(json.dumps(results["flask"]), flush=True)

    answer = Response("", 200)
    with app.test_request_context("/twilio/webhook", method="POST") as context:
        context.match_request()

        def timing_hooks() -> None:
            http_timing._start()
            http_timing._observe(answer)

        results["timing_hooks"] = interleaved({"request timing hooks": timing_hooks}, args.blocks, args.block)
    print(json.dumps(results["timing_hooks"]), flush=True)

    class Request:  # what gunicorn's Logger.access reads of a request
        method, path, query, uri, version = "POST", "/twilio/webhook", "", "/twilio/webhook", (1, 1)
        headers = [("HOST", "bench.example.test"), ("CONTENT-TYPE", "application/x-www-form-urlencoded"),
                   ("USER-AGENT", "TwilioProxy/1.1")]

    class Answer:
        status, status_code, sent, response_length = "200 OK", 200, 57, 57
        headers = [("Content-Type", "text/xml"), ("Content-Length", "57")]

    wsgi_environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/twilio/webhook", "QUERY_STRING": "",
                    "REMOTE_ADDR": "127.0.0.1", "SERVER_PROTOCOL": "HTTP/1.1", "RAW_URI": "/twilio/webhook"}
    loggers = {}
    for name, kind in (("gunicorn's Logger", Logger), ("MaskingLogger", MaskingLogger)):
        config = Config()
        config.set("accesslog", os.devnull)
        config.set("errorlog", os.devnull)
        loggers[name] = kind(config)
    took = datetime.timedelta(milliseconds=2)
    results["access_log"] = interleaved(
        {name: (lambda logger=logger: logger.access(Answer(), Request(), wsgi_environ, took))
         for name, logger in loggers.items()}, args.blocks, args.block)
    print(json.dumps(results["access_log"]), flush=True)


if __name__ == "__main__":
    main()
