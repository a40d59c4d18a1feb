"""Odd but authenticated input to the events routes: a 400 with a JSON `error`, never a 500.

Each case once answered 500: `str.isdigit()` takes "²" and "①", which `int()` refuses; an offset
that carries a time past year 1 or 9999 raises OverflowError, not ValueError.
"""
from __future__ import annotations

import pytest

from tests.delivery.test_events import AUTH, events_app, receiver  # noqa: F401


@pytest.mark.parametrize("query", ["limit=²", "limit=①", "limit=٣", "limit=1" + "0" * 40, "limit=+5", "limit= 5"])
def test_a_limit_that_is_not_ascii_digits_is_a_400(app, client, auth, query):
    response = client.get(f"/events?{query}", headers=auth)
    assert response.status_code == 400 and "limit" in response.get_json()["error"]


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-13-01", ""])
def test_a_since_out_of_range_is_a_400(events_app, since):
    response = events_app.test_client().post("/events/retry", json={"since": since}, headers=AUTH)
    assert response.status_code == 400 and "since" in response.get_json()["error"]


def test_the_edges_of_since_that_exist_are_accepted(events_app):
    client = events_app.test_client()
    for since in ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00-01:00", "9999-12-31T23:59:59+01:00"):
        assert client.post("/events/retry", json={"since": since}, headers=AUTH).status_code == 202, since
