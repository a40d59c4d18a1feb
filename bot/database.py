"""Database setup: Flask-SQLAlchemy binding, SQLite settings for web + worker on one file, and a
PostgreSQL connection attempt that gives up in seconds."""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from flask import Flask

from bot.extensions import db

#: The Alembic migrations (`flask db upgrade`, the Procfile's release line).
MIGRATIONS_DIR = str(Path(__file__).parent / "migrations")
#: How long a new PostgreSQL connection may take before the attempt fails.
CONNECT_TIMEOUT_SECONDS = 5


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
    if uri.startswith("sqlite"):
        with app.app_context():
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the web read while the worker writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
