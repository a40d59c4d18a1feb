"""Errors every route answers the same way: a database that cannot be reached is a 503.

A backend calling /notify, /messages, /contacts, /events... while PostgreSQL is away (a failover,
a restart, a cut network) gets 503 with `Retry-After` and a JSON `error`, as `/healthz` reports the
outage, never a 500 (docs/ARCHITECTURE.md, "HTTP contract"; docs/reliability.md). Nothing was
committed, so retrying the same request (with its `Idempotency-Key`) is safe. The Twilio webhook
keeps its own answer: it hands the form to the queue and acknowledges it (invariant 11), and only
reaches this handler with a database error that is not an outage, which stays a 500.
"""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from sqlalchemy.exc import SQLAlchemyError

from bot.delivery.webhook_fallback import database_unavailable, forget_failed_session

log = logging.getLogger(__name__)

#: Seconds a backend is asked to wait before retrying: a pooled connection is re-made in
#: milliseconds once the database answers, and a failover takes seconds.
RETRY_AFTER_SECONDS = 5


def init_app(app: Flask) -> None:
    """Register the database-outage answer for every route."""
    app.register_error_handler(SQLAlchemyError, database_unavailable_503)


def database_unavailable_503(exc: SQLAlchemyError) -> Response:
    """503 + Retry-After + JSON for a database that cannot be reached; any other database error
    is re-raised, to be logged and answered as the bug it is."""
    if not database_unavailable(exc):
        raise exc
    forget_failed_session()  # the next request starts with a clean session (pre-ping re-connects)
    # The exception's text can name the host and the statement; its kind is enough here.
    log.warning("database unavailable (%s): request answered 503", type(exc).__name__)
    response = jsonify(error="temporarily unavailable: the database cannot be reached; retry later "
                             "(with the same Idempotency-Key, if you sent one)")
    response.status_code = 503
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
