"""Fixtures of the dashboard's tests: an operator account, and the browser-like client
(tests/dashboard/client.py) signed out or signed in."""
from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bot.dashboard import accounts
from bot.dashboard.sign_in_limit import sign_in_limit
from bot.extensions import db
from tests.dashboard.client import EMAIL, PASSWORD, Dashboard


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


@pytest.fixture
def dash(client: FlaskClient) -> Dashboard:
    return Dashboard(client)


@pytest.fixture
def signed_in(dash: Dashboard, operator: str) -> Dashboard:
    response = dash.sign_in()
    assert response.status_code == 302, response.get_data(as_text=True)[-500:]
    dash.get("/dashboard/")  # a signed-in page's token for the forms that follow
    return dash
