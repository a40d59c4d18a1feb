"""Signing in and out: the form, the checks, a new session id at every sign-in, and development
mode's one-time link (docs/dashboard.md, "Signing in")."""
from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, session, url_for

from bot.dashboard import accounts
from bot.dashboard.security import SESSION_LIFETIME, safe_next
from bot.dashboard.sign_in_limit import LimitUnavailable, sign_in_limit
from bot.models import Operator

bp = Blueprint("sign_in", __name__)

MAX_EMAIL_CHARS = 254


def _next_target() -> str:
    return safe_next(request.values.get("next"))


def _form(error: str | None = None, status: int = 200, email: str = ""):
    return render_template("dashboard/sign_in.html", error=error, email=email,
                           next=_next_target()), status


@bp.get("/sign-in")
def form():
    """The sign-in form."""
    return _form()


@bp.post("/sign-in")
def submit():
    """Check the address and password under the attempt limits; a new session on success."""
    email = request.form.get("email", "").strip()
    password = request.form.get("password", "")
    if not email or not password:
        return _form("Enter your email address and your password.", 400, email[:MAX_EMAIL_CHARS])
    if len(email) > MAX_EMAIL_CHARS or len(password) > accounts.MAX_PASSWORD_CHARS:
        return _form("That email address or password is too long.", 400)
    address = request.remote_addr or "unknown"
    limit = sign_in_limit()
    try:
        if not limit.allows(email, address):
            current_app.logger.warning("dashboard sign-in refused: too many failed attempts")
            return _form("Too many failed sign-ins for this account or from this address. "
                         "Wait 15 minutes, then try again.", 429, email)
        operator = accounts.authenticate(email, password)
        if operator is None:
            limit.failed(email, address)
            return _form("Wrong email address or password.", 401, email)
    except LimitUnavailable:
        return _form("Sign-in is unavailable: the attempt counter (Redis) cannot be reached. Try again shortly.",
                     503, email)
    _start_session(operator)
    return redirect(_next_target())


def _start_session(operator: Operator) -> None:
    """A fresh session: whatever the browser held before (its CSRF token too) is dropped, so a
    session id planted before sign-in never becomes a signed-in one (no fixation)."""
    accounts.close_session(session.get("token"))
    session.clear()
    session["token"] = accounts.open_session(operator, SESSION_LIFETIME)
    session.permanent = True


@bp.post("/sign-out")
def sign_out():
    """End this session, on the server too."""
    accounts.close_session(session.get("token"))
    session.clear()
    flash("Signed out.")
    return redirect(url_for("dashboard.sign_in.form"))


@bp.get("/sign-in/link/<token>")
def link(token: str):
    """Development mode's one-time link (`flask operator dev-link`, printed by bin/dev): signs
    the development operator in. Not found outside development mode."""
    if not current_app.config.get("DEV_MODE"):
        abort(404, description="one-time sign-in links work in development mode only")
    operator = accounts.use_login_link(token)
    if operator is None:
        abort(410, description="this sign-in link was used already or has expired; bin/dev prints a new one "
                               "(or run `flask operator dev-link`)")
    _start_session(operator)
    return redirect(_next_target())
