"""The operators' dashboard at /dashboard: server-rendered pages (Jinja2), signed-in operators
only (docs/dashboard.md).

It sits above the HTTP layer and beside it: it reuses the API's own code paths (an agent's reply
is `POST /notify` with `agent`, "give back to the bot" is `DELETE /contacts/<phone>/handoff`, a
replay is `POST /events/<id>/retry`), and nothing in bot/http imports it. Its cookie, its CSRF
checks and its Content-Security-Policy apply to its pages only: the API and the webhooks are as
they were.
"""
from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the dashboard's blueprint, its cookie settings, CSRF and the `flask operator` commands."""
    from bot.dashboard import blueprint, cli
    from bot.dashboard.security import SESSION_LIFETIME, csrf

    # The cookie goes only to /dashboard (never to the API), unreadable by scripts and not sent on
    # cross-site sub-requests; create_app makes it HTTPS-only outside development mode.
    app.config.update(SESSION_COOKIE_NAME="dashboard_session", SESSION_COOKIE_PATH="/dashboard",
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
                      # The token lives as long as the sign-in (a page left open for an hour still posts).
                      WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=None)
    csrf.init_app(app)
    app.register_blueprint(blueprint.bp)
    cli.init_app(app)

