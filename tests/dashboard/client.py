"""A browser-like test client of the dashboard: it signs in over HTTPS (the cookie is Secure
outside development mode), sends the Referer a browser sends and posts each form with the CSRF
token of the page it came from."""
from __future__ import annotations

import random
import re
from typing import Any

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

BASE = "https://bot.example.test"
EMAIL = "ops@example.com"
PASSWORD = "correct horse battery staple"
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(response: TestResponse) -> str:
    """The CSRF token of the first form on a page."""
    found = CSRF_FIELD.search(response.get_data(as_text=True))
    assert found, f"no CSRF token on the page ({response.status_code})"
    return found.group(1)


class Dashboard:
    """A signed-out (then signed-in) browser on the dashboard."""

    def __init__(self, client: FlaskClient, address: str | None = None) -> None:
        self.client = client
        self.token: str | None = None
        # An address of its own: the sign-in limit counts per address, in Redis across tests.
        self.address = address or f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
        client.environ_base["REMOTE_ADDR"] = self.address

    def get(self, path: str, **kwargs: Any) -> TestResponse:
        response = self.client.get(path, base_url=BASE, **kwargs)
        if CSRF_FIELD.search(response.get_data(as_text=True)):
            self.token = csrf_token(response)
        return response

    def post(self, path: str, data: dict[str, Any] | None = None, *, with_token: bool = True,
             **kwargs: Any) -> TestResponse:
        form = dict(data or {})
        if with_token:
            if self.token is None:
                self.get("/dashboard/sign-in")
            form.setdefault("csrf_token", self.token)
        headers = {"Referer": BASE + "/dashboard/", **kwargs.pop("headers", {})}
        return self.client.post(path, data=form, base_url=BASE, headers=headers, **kwargs)

    def sign_in(self, email: str = EMAIL, password: str = PASSWORD, next: str | None = None) -> TestResponse:
        self.get("/dashboard/sign-in" + (f"?next={next}" if next else ""))
        data = {"email": email, "password": password}
        if next is not None:
            data["next"] = next
        return self.post("/dashboard/sign-in", data)

    def cookie(self) -> str | None:
        found = self.client.get_cookie("dashboard_session", domain="bot.example.test", path="/dashboard")
        return found.value if found else None
