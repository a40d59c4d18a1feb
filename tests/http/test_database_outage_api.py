"""The backend's API while the database cannot be reached: 503 with Retry-After, never a 500.

Seen in the database-outage fault run: POST /notify answered 500 while PostgreSQL was cut (issue
15). Every route with the bearer token now answers 503, `Retry-After` and a JSON `error`, and the
next request after the outage goes through. The webhook keeps its own answer (queued, 200:
tests/delivery/test_outage.py).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from flask import Flask

from bot import create_app
from bot.extensions import db
from bot.models import new_id
from tests.conftest import make_contact
from tests.tcp_proxy import TcpProxy
from tests.http.test_hardening import needs_the_token
from tests.delivery.test_outage import database_down
from tests.faults.test_outage_processes import proxied_stack, stack_settings  # noqa: F401  (fixtures, used below)

PHONE = "+15557770101"

#: A request each route would take (a body it accepts), so it reaches the database.
VALID_BODIES = {
    "POST /notify": {"to": PHONE, "body": "your order shipped"},
    "PUT /contacts/<phone>/consent": {"consent": "opted_in"},
    "POST /contacts/<phone>/handoff": {"reason": "billing"},
}


def _path(rule: str) -> str:
    return rule.replace("<phone>", PHONE).replace("<message_id>", new_id()).replace(
        "<conversation_id>", new_id()).replace("<event_id>", new_id())


def _api_requests(app: Flask) -> list[tuple[str, str, str]]:
    """(method, rule, path) of every route that needs the bearer token."""
    found = []
    for rule in app.url_map.iter_rules():
        if not needs_the_token(rule.endpoint):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((method, rule.rule, _path(rule.rule)))
    return found


def _assert_unavailable(response, what: str) -> None:
    assert response.status_code == 503, f"{what} answered {response.status_code}: {response.get_data(as_text=True)[:300]}"
    assert int(response.headers["Retry-After"]) > 0, what
    body = response.get_json()
    assert body and "database" in body["error"], what
    assert PHONE not in response.get_data(as_text=True)  # no number, no host, no statement


def test_every_api_route_answers_503_with_retry_after_while_the_database_is_down(app, client, auth):
    with app.app_context():
        make_contact(PHONE)
    checked = []
    with database_down(app):
        for method, rule, path in _api_requests(app):
            response = client.open(path, method=method, json=VALID_BODIES.get(f"{method} {rule}", {}), headers=auth)
            what = f"{method} {rule}"
            if response.status_code < 500 and f"{method} {rule}" not in VALID_BODIES:
                # A route that refuses `{}` before any query (a 4xx) is fine: bad input stays a 400.
                assert 400 <= response.status_code < 500, what
                continue
            _assert_unavailable(response, what)
            checked.append(what)
    assert {"POST /notify", "GET /messages/<message_id>", "GET /contacts/<phone>", "GET /events",
            "PUT /contacts/<phone>/consent", "POST /contacts/<phone>/handoff",
            "DELETE /contacts/<phone>/handoff"} <= set(checked), checked
    # Back: the very next request goes through, on a fresh connection.
    response = client.post("/notify", json=VALID_BODIES["POST /notify"], headers=auth)
    assert response.status_code == 202, response.get_json()


def test_a_database_bug_is_still_not_dressed_up_as_an_outage(app, client, auth, monkeypatch):
    """Only an unreachable database is a 503: an error retrying cannot fix stays a 500 (logged)."""
    import sqlalchemy as sa

    from bot.http import notify as notify_route

    def broken(*_args, **_kwargs):
        raise sa.exc.ProgrammingError("SELECT", {}, Exception("relation does not exist"))

    monkeypatch.setattr(notify_route, "_notify_number", broken)  # the message-to-a-number path's database work
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer as in production instead of raising into the test
    response = client.post("/notify", json=VALID_BODIES["POST /notify"], headers=auth)
    assert response.status_code == 500 and "Retry-After" not in response.headers


@pytest.fixture
def proxied_app(app, base_config) -> Iterator[tuple[Flask, TcpProxy]]:
    """An app whose database connections go through a TCP proxy the test can cut (PostgreSQL)."""
    with TcpProxy.for_url(base_config["DATABASE_URL"]) as proxy:
        proxied = create_app({**base_config, "TESTING": True,
                              "DATABASE_URL": proxy.url_through(base_config["DATABASE_URL"])})
        try:
            yield proxied, proxy
        finally:
            proxy.restore()
            with proxied.app_context():
                db.session.remove()
                db.engine.dispose()


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL only: a network cut between the web and its database server")
def test_notify_while_postgresql_is_cut_is_a_503_and_goes_through_once_it_is_back(proxied_app, auth):
    app, proxy = proxied_app
    client = app.test_client()
    with app.app_context():
        make_contact(PHONE)
    payload = {"to": PHONE, "body": "your order shipped"}
    assert client.post("/notify", json=payload, headers=auth).status_code == 202  # the pool holds a live connection
    proxy.cut()  # the pooled connection is reset, new ones are refused
    for _ in range(3):
        _assert_unavailable(client.post("/notify", json=payload, headers={**auth, "Idempotency-Key": "k-1"}),
                            "POST /notify during the cut")
    _assert_unavailable(client.get("/events", headers=auth), "GET /events during the cut")
    proxy.restore()
    deadline = time.monotonic() + 30  # a liveness bound: the pool re-connects on the next checkout
    while (response := client.post("/notify", json=payload, headers={**auth, "Idempotency-Key": "k-1"})).status_code == 503:
        assert time.monotonic() < deadline, "the API did not recover after the database came back"
        time.sleep(0.2)
    assert response.status_code == 202, response.get_json()


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL", "").startswith("postgres") and os.environ.get("TEST_REDIS_URL")),
                    reason="needs PostgreSQL and Redis: a TCP proxy is cut in front of PostgreSQL")
def test_notify_against_the_real_web_while_postgresql_is_cut_is_never_a_500(proxied_stack, app):
    """The fault run's case, with the Procfile's gunicorn: each /notify during the cut is a 503
    with Retry-After (or a 202); retried with its key after the cut, each is sent exactly once."""
    import requests

    from tests.faults.test_outage_processes import AUTH, replies_to
    from tests.faults.test_processes import wait_until

    base, simulator, database = proxied_stack["base"], proxied_stack["simulator"], proxied_stack["database"]
    phones = [f"+1555420{i:04d}" for i in range(5)]
    with app.app_context():
        for phone in phones:
            make_contact(phone)

    def notify(i: int) -> requests.Response:
        return requests.post(base + "/notify", json={"to": phones[i % len(phones)], "body": f"notice {i}"},
                             headers={**AUTH, "Idempotency-Key": f"outage-{i}"}, timeout=30)

    database.cut()
    answers = []
    for i in range(10):
        response = notify(i)
        answers.append(response.status_code)
        assert response.status_code in (202, 503), (response.status_code, response.text[:300])
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) > 0 and "database" in response.json()["error"]
    database.restore()
    for i in range(10):  # what a backend does with a 503: the same request again, later
        wait_until(lambda: notify(i).status_code == 202, timeout=60, what=f"/notify {i} to be accepted after the cut")
    wait_until(lambda: sum(replies_to(simulator).values()) >= 10, timeout=90, what="the ten notices to be sent")
    time.sleep(1)  # a duplicate would come right behind
    sent = sorted(message["body"] for message in simulator.messages)
    assert sent == sorted(f"notice {i}" for i in range(10)), sent  # each once
    print(f"\n/notify during a PostgreSQL cut: {answers.count(503)} answered 503 + Retry-After, "
          f"{answers.count(202)} 202, 0 500; all 10 sent exactly once after retrying with their keys")
