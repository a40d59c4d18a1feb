"""What keeps the dashboard's pages safe, named once: the CSRF protection, the session's
lifetime, the Content-Security-Policy and the check of every `?next=` (docs/dashboard.md, "Security")."""
from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from flask_wtf.csrf import CSRFProtect

#: Flask-WTF's CSRF protection, bound by `bot.dashboard.init_app` but checked only by the
#: dashboard's own before-request hook (WTF_CSRF_CHECK_DEFAULT off): the API and the webhooks
#: carry no form token and are not touched.
csrf = CSRFProtect()

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
