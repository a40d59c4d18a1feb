"""The dashboard's blueprint: what every page shares (sign-in required, CSRF on every form, a
strict Content-Security-Policy, HTML errors) and the pages, each a nested blueprint of its own."""
from __future__ import annotations

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from bot.dashboard import accounts
from bot.dashboard.security import CONTENT_SECURITY_POLICY, csrf
from bot.dashboard import conversations_page, events_page, handoff_inbox, health_strip, messages, sign_in

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates",
               static_folder="static", static_url_path="/static")
bp.register_blueprint(sign_in.bp)
bp.register_blueprint(messages.bp)
bp.register_blueprint(events_page.bp)
bp.register_blueprint(handoff_inbox.bp)
bp.register_blueprint(conversations_page.bp)

#: Pages a visitor who is not signed in may open: the sign-in form and its stylesheet.
OPEN_ENDPOINTS = frozenset({"dashboard.sign_in.form", "dashboard.sign_in.submit", "dashboard.sign_in.link",
                            "dashboard.static"})


@bp.before_request
def signed_in_operators_only() -> Response | None:
    """Every page but sign-in needs a live operator session (the API's bearer token opens
    nothing here); every POST needs the form's CSRF token."""
    if request.endpoint == "dashboard.static":
        return None
    if not current_app.secret_key:
        abort(503, description="the dashboard needs SECRET_KEY (docs/configuration.md) to sign operators in")
    if request.method == "POST":
        csrf.protect()  # a missing or wrong token: CSRFError, a 400 page
    g.operator = accounts.session_operator(session.get("token"))
    if g.operator is not None or request.endpoint in OPEN_ENDPOINTS:
        return None
    if request.method in ("GET", "HEAD"):
        return redirect(url_for("dashboard.sign_in.form", next=request.full_path.rstrip("?")))
    abort(401, description="sign in first")


@bp.after_request
def page_headers(response: Response) -> Response:
    """Headers of every dashboard answer: the CSP, no framing or sniffing, and no copy of a page
    with numbers and bodies in a shared cache."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.app_template_global()
def health() -> health_strip.Health:
    """The health strip at the top of every signed-in page."""
    return health_strip.read()


@bp.errorhandler(HTTPException)
def html_error(exc: HTTPException):
    """An error on a dashboard page is a page saying what went wrong (never a 500 for bad input)."""
    return render_template("dashboard/error.html", code=exc.code, message=exc.description or exc.name), exc.code or 500

