"""Fixtures of the dashboard's tests: an operator account, and a browser-like client that signs
in over HTTPS (the cookie is Secure outside development mode), sends the Referer a browser sends
and posts each form with the CSRF token of the page it came from."""
from __future__ import annotations

import random
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from bot.dashboard import accounts
from bot.dashboard.sign_in_limit import sign_in_limit
from bot.extensions import db

BASE = "https://bot.example.test"
EMAIL = "ops@example.com"
PASSWORD = "correct horse battery staple"
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def operator(app: Flask) -> str:
    """An operator account (EMAIL, PASSWORD); returns the address."""
    with app.app_context():
        accounts.create_operator(EMAIL, PASSWORD)
        db.session.commit()
        # With Redis the failed sign-ins of earlier tests are still counted (the count outlives
        # an app, as it must outlive a web process): each test starts with none.
        sign_in_limit().clear_account(EMAIL)
    return EMAIL


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


@pytest.fixture
def dash(client: FlaskClient) -> Dashboard:
    return Dashboard(client)


@pytest.fixture
def signed_in(dash: Dashboard, operator: str) -> Dashboard:
    response = dash.sign_in()
    assert response.status_code == 302, response.get_data(as_text=True)[-500:]
    dash.get("/dashboard/")  # a signed-in page's token for the forms that follow
    return dash
