"""What keeps the dashboard's pages safe, named once: the CSRF protection, the session's
lifetime, the Content-Security-Policy and the check of every `?next=` (docs/dashboard.md, "Security")."""
from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flask import Flask

if TYPE_CHECKING:
    from flask_wtf.csrf import CSRFProtect


def csrf_token() -> str:
    """The form's CSRF token (templates: `{{ csrf_token() }}`): Flask-WTF's `generate_csrf`."""
    from flask_wtf.csrf import generate_csrf

    return generate_csrf()


class LazyCSRF:
    """Flask-WTF's CSRF protection, imported on the dashboard's first form or POST.

    Why not `CSRFProtect` bound at start: importing it imports Flask-WTF, WTForms, babel's
    formatting and urllib.request in every web process, memory that no API request or webhook
    uses (bench/THROUGHPUT.md, "Web memory"). What the dashboard uses of it is unchanged: the
    token in its forms (`generate_csrf`), checked on every POST by `CSRFProtect.protect`, with
    the settings' defaults `CSRFProtect.init_app` sets (tests/dashboard/test_security.py compares
    them). Its app-wide before-request hook is not registered: with WTF_CSRF_CHECK_DEFAULT off
    it returned at once on every request, the API's and the webhooks' included.
    """

    def __init__(self) -> None:
        self._protection: CSRFProtect | None = None

    def init_app(self, app: Flask) -> None:
        """Flask-WTF's defaults for the settings the app leaves unset, and `csrf_token()` in templates."""
        app.config.setdefault("WTF_CSRF_ENABLED", True)
        app.config.setdefault("WTF_CSRF_CHECK_DEFAULT", True)
        app.config["WTF_CSRF_METHODS"] = set(app.config.get("WTF_CSRF_METHODS", ["POST", "PUT", "PATCH", "DELETE"]))
        app.config.setdefault("WTF_CSRF_FIELD_NAME", "csrf_token")
        app.config.setdefault("WTF_CSRF_HEADERS", ["X-CSRFToken", "X-CSRF-Token"])
        app.config.setdefault("WTF_CSRF_META_NAME", "csrf-token")
        app.config.setdefault("WTF_CSRF_TIME_LIMIT", 3600)
        app.config.setdefault("WTF_CSRF_SSL_STRICT", True)
        app.jinja_env.globals["csrf_token"] = csrf_token

    def protect(self) -> None:
        """Check the request's CSRF token: `CSRFProtect.protect` (a missing or wrong one raises
        CSRFError, a 400)."""
        if self._protection is None:
            from flask_wtf.csrf import CSRFProtect

            self._protection = CSRFProtect()
        self._protection.protect()


#: The dashboard's CSRF protection, bound by `bot.dashboard.init_app` and checked only by the
#: dashboard's own before-request hook: the API and the webhooks carry no form token and are not touched.
csrf = LazyCSRF()

#: How long a sign-in lasts (the cookie and the server's session row alike).
SESSION_LIFETIME = timedelta(hours=12)

#: No inline script or style, nothing from another origin, no framing, forms post only here.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

DEFAULT_PAGE = "/dashboard/"


def safe_next(target: str | None, default: str = DEFAULT_PAGE) -> str:
    """Where to go after signing in or acting: a path of this dashboard, never another site
    (`//evil.example`, `https://…`, `/\\evil.example` and the like give `default`)."""
    if not target or len(target) > 2000 or "\\" in target or any(ord(ch) < 32 for ch in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//") or not parts.path.startswith("/dashboard"):
        return default
    return target
