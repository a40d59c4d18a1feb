"""Database setup: Flask-SQLAlchemy binding, SQLite settings for web + worker on one file, a
PostgreSQL connection attempt that gives up in seconds, and a ping for pooled connections that
sat idle."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

from bot.extensions import db

#: The Alembic migrations (`flask db upgrade`, the Procfile's release line).
MIGRATIONS_DIR = str(Path(__file__).parent / "migrations")
#: How long a new PostgreSQL connection may take before the attempt fails.
CONNECT_TIMEOUT_SECONDS = 5
#: A pooled connection unused for longer than this is pinged before it is handed out.
PING_AFTER_IDLE_SECONDS = 1.0


def init_app(app: Flask) -> None:
    """Bind the models to SQLALCHEMY_DATABASE_URI; make SQLite safe for two processes."""
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite"):
        options = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {}))
        # The web and the worker write the same file: wait for the lock instead of failing.
        options.setdefault("connect_args", {"timeout": 30})
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    elif uri.startswith("postgresql"):
        options = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {}))
        # A database host that vanished without a reset would hold a connection attempt for
        # minutes, longer than Twilio waits for a webhook (15 s): give up soon, so the webhook
        # hands its form to the queue instead (invariant 11).
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, **options.get("connect_args", {})}
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    db.init_app(app)
    with app.app_context():
        if uri.startswith("sqlite"):
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
        ping_idle_connections(db.engine)


def ping_idle_connections(engine: sa.Engine) -> None:
    """Ping a pooled connection before handing it out only if it sat unused for more than
    PING_AFTER_IDLE_SECONDS; a dead one (the database restarted, a proxy dropped it) is replaced,
    and every older one with it, before the request sees it.

    What `pool_pre_ping` does, without its round trip on every checkout: under load a connection
    is back in use within milliseconds, and that ping was a round trip per request
    (bench/THROUGHPUT.md, "The web's hot path"). The cost: a connection that dies within a second
    of its last use fails the statement that uses it; the pool is then invalidated, and that one
    request answers 503 (or hands its webhook to the queue) as it would with the database down.
    """

    @sa.event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool reconnects (and so finds an outage: the request's usual 503).
            raise sa.exc.InvalidatePoolError("an idle pooled connection is dead") from exc


def close_after_reads() -> None:
    """Give the session's connection back after a transaction that only read: what it loaded
    stays usable (detached, not expired), and the transaction ends with COMMIT, not ROLLBACK.

    psycopg forgets every statement it has prepared on a connection at each ROLLBACK (and sends
    DEALLOCATE ALL), so the next few runs of each statement on that connection are parsed and
    planned again, ten times the database's CPU of a prepared run (bench/THROUGHPUT.md,
    "Broadcasts", twelfth run). For a transaction that only read, COMMIT and ROLLBACK are the same
    to the database. Callers must have committed or rolled back their writes first: this commits
    whatever is still pending.
    """
    db.session.expunge_all()
    db.session.commit()
    db.session.close()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the web read while the worker writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
