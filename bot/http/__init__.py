"""The HTTP layer: every route, its request authentication and its request schemas.

Routes validate, store and enqueue; they never call Twilio and never run a flow
(docs/ARCHITECTURE.md, "Web answers fast").
"""
from __future__ import annotations

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException


def init_app(app: Flask) -> None:
    """Register every blueprint, JSON bodies for every HTTP error, and a 503 for a database outage."""
    from bot.http import (broadcasts_api, cancel_api, contacts_api, email_hooks, errors, events_api, handoff_api,
                          health, metrics_api, notify, openapi, users_api, webhook)

    app.register_blueprint(notify.bp)
    app.register_blueprint(cancel_api.bp)
    app.register_blueprint(contacts_api.bp)
    app.register_blueprint(events_api.bp)
    app.register_blueprint(handoff_api.bp)
    app.register_blueprint(users_api.bp)
    app.register_blueprint(broadcasts_api.bp)
    app.register_blueprint(webhook.bp)
    app.register_blueprint(email_hooks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(metrics_api.bp)
    app.register_error_handler(HTTPException, _json_http_error)
    errors.init_app(app)


def _json_http_error(exc: HTTPException):
    """Every HTTP error as JSON with an `error` message (backends parse JSON, not HTML)."""
    response = jsonify(error=exc.description or exc.name)
    response.status_code = exc.code or 500
    for header in ("Allow", "WWW-Authenticate", "Retry-After"):
        if exc.get_response().headers.get(header):
            response.headers[header] = exc.get_response().headers[header]
    return response
