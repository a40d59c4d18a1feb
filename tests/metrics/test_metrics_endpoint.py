"""GET /metrics in-process: its token, its text format (parsed by prometheus_client's own parser),
every family docs/metrics.md lists, and figures that match what the database holds."""
from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from bot import create_app
from bot.clock import utcnow
from bot.delivery.queue import huey
from bot.extensions import db
from bot.metrics import counters
from bot.models import Event, Message
from bot.devtools.simulator import sign
from tests.conftest import (API_TOKEN, AUTH_TOKEN, PUBLIC_BASE, WEBHOOK_URL, empty_tables, in_process_queue_options,
                            inbound_form, make_contact, run_queue)

METRICS_TOKEN = "test-metrics-token"
#: Every family docs/metrics.md lists (as the parser names them: a counter without `_total`).
FAMILIES = {
    "bot_up", "bot_messages", "bot_messages_estimated", "bot_messages_failed_24h", "bot_oldest_pending_age_seconds",
    "bot_queue_depth",
    "bot_queue_scheduled", "bot_events", "bot_events_oldest_pending_age_seconds", "bot_contacts_in_handoff",
    "bot_conversations_active", "bot_readings_duration_seconds",
    "bot_sends", "bot_send_duration_seconds", "bot_rate_limit_wait_seconds", "bot_send_retries",
    "bot_unknown_fate_lookups", "bot_fallbacks", "bot_provider_callbacks",
    "bot_http_request_duration_seconds",
}


@pytest.fixture
def metrics_app(base_config: dict[str, Any], _schema: None, twilio) -> Iterator[Flask]:
    """The test app with metrics on, and events going to a receiver that is down (they stay pending)."""
    app = create_app({**base_config, "TESTING": True, "METRICS_TOKEN": METRICS_TOKEN,
                      "EVENTS_WEBHOOK_URL": "http://127.0.0.1:9/events",
                      "EVENTS_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"k" * 32).decode(),
                      "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    with app.app_context():
        empty_tables()
    huey.flush()
    counters.store().clear()
    twilio.reset()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    huey.flush()
    counters.store().clear()


def scrape(client, **headers: str) -> dict[str, Any]:
    """GET /metrics with the token, parsed: {family name: family}."""
    response = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}", **headers})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.get_data(as_text=True))}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    """The one sample named `sample_name` whose labels include `labels` (0 when there is none)."""
    family_name = sample_name.removesuffix("_total")
    found = [sample.value for family in families.values() for sample in family.samples
             if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, f"{sample_name}{labels}: {found}"
    assert family_name in families or sample_name.rsplit("_", 1)[0] in families
    return found[0] if found else 0.0


def test_no_token_configured_is_a_404(client):
    response = client.get("/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert response.status_code == 404 and response.get_json()["error"]


@pytest.mark.parametrize("authorization", [None, f"Bearer {API_TOKEN}", "Bearer wrong", f"Bearer {METRICS_TOKEN}x",
                                           "Basic !!!", "Basic " + base64.b64encode(b"prometheus:wrong").decode(),
                                           f"Token {METRICS_TOKEN}"])
def test_a_missing_or_wrong_token_is_a_401(metrics_app, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = metrics_app.test_client().get("/metrics", headers=headers)
    assert response.status_code == 401 and response.get_json()["error"]
    assert METRICS_TOKEN not in response.get_data(as_text=True)


def test_the_metrics_token_opens_nothing_else(metrics_app):
    response = metrics_app.test_client().get("/events", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 401


def test_bearer_and_basic_auth_both_open_it_and_every_family_is_there(metrics_app):
    client = metrics_app.test_client()
    client.get("/healthz")  # one request timed before the scrape
    families = scrape(client)
    basic = base64.b64encode(f"prometheus:{METRICS_TOKEN}".encode()).decode()
    assert scrape(client, Authorization=f"Basic {basic}").keys() == families.keys()
    assert FAMILIES <= set(families), sorted(FAMILIES - set(families))
    assert value(families, "bot_up", dependency="database") == 1 and value(families, "bot_up", dependency="queue") == 1
    for lane in ("conversation", "bulk", "email"):
        assert value(families, "bot_oldest_pending_age_seconds", lane=lane) == 0
        assert value(families, "bot_queue_depth", lane=lane) == 0
    assert value(families, "bot_http_request_duration_seconds_count", route="/healthz", method="GET",
                 status="200") >= 1


def test_figures_match_the_database_after_a_scripted_run(metrics_app, twilio):
    """N sent, M failed with 63016 (the window closed while they waited), K events pending (the
    receiver is down), one message still waiting in the bulk lane."""
    sent, refused = 4, 3
    client = metrics_app.test_client()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    with metrics_app.app_context():
        late = [make_contact(f"+1555000010{i}", inbound_ago=timedelta(hours=23, minutes=59)).id for i in range(refused)]
        for i in range(sent):
            make_contact(f"+1555000020{i}")
    for i in range(refused):
        assert client.post("/notify", json={"to": f"+1555000010{i}", "body": "late"}, headers=auth).status_code == 202
    for i in range(sent):
        assert client.post("/notify", json={"to": f"+1555000020{i}", "body": "hi"}, headers=auth).status_code == 202
    with metrics_app.app_context():
        db.session.execute(sa.text("UPDATE contacts SET last_inbound_at = :t WHERE id IN :ids")
                           .bindparams(sa.bindparam("ids", expanding=True)),
                           {"t": utcnow() - timedelta(hours=25), "ids": late})
        db.session.commit()
    run_queue()
    with metrics_app.app_context():
        make_contact("+15550000300")
    huey.flush()  # this one's task is lost: it waits in the database for the sweep
    assert client.post("/notify", json={"to": "+15550000300", "body": "waiting"}, headers=auth).status_code == 202
    huey.flush()

    families = scrape(client)

    with metrics_app.app_context():
        by_status = dict(db.session.execute(sa.select(Message.status, sa.func.count()).group_by(Message.status)).all())
        failed_63016 = db.session.scalar(sa.select(sa.func.count()).where(Message.error_code == 63016,
                                                                           Message.status == "failed"))
        pending_events = db.session.scalar(sa.select(sa.func.count()).where(Event.status == "pending"))
    assert failed_63016 == refused and pending_events > 0 and by_status["pending"] == 1
    assert len(twilio.messages) == sent
    for status, count in by_status.items():
        assert value(families, "bot_messages", channel="whatsapp", direction="outbound", status=status) == count
    assert value(families, "bot_messages_failed_24h", channel="whatsapp", error_code="63016") == refused
    assert value(families, "bot_sends_total", channel="whatsapp", outcome="refused", error_code="63016") == refused
    assert value(families, "bot_sends_total", channel="whatsapp", outcome="accepted", error_code="") == sent
    assert value(families, "bot_send_duration_seconds_count", channel="whatsapp") == sent
    assert value(families, "bot_rate_limit_wait_seconds_count", channel="whatsapp") == sent
    assert value(families, "bot_events", receiver="backend", status="pending") == pending_events
    assert value(families, "bot_oldest_pending_age_seconds", lane="bulk") > 0
    assert value(families, "bot_oldest_pending_age_seconds", lane="conversation") == 0
    assert value(families, "bot_http_request_duration_seconds_count", route="/notify", method="POST",
                 status="202") == sent + refused + 1


def test_counts_flushed_by_another_process_are_in_the_scrape(metrics_app):
    """The worker's counts reach the web's scrape through the shared store, not the web's memory."""
    counters.store().add({counters.sample_key("bot_sends_total", (("channel", "email"), ("outcome", "failed"),
                                                                   ("error_code", "400"))): 2.0})
    families = scrape(metrics_app.test_client())
    assert value(families, "bot_sends_total", channel="email", outcome="failed", error_code="400") == 2


def test_an_unreachable_store_keeps_the_counts_for_the_next_flush(metrics_app, monkeypatch):
    counters.send_outcome("whatsapp", "accepted")
    store = counters.store()
    monkeypatch.setattr(store, "add", lambda deltas: (_ for _ in ()).throw(ConnectionError("down")))
    assert counters.flush() is False
    monkeypatch.undo()
    assert counters.flush() is True
    assert store.totals()[counters.sample_key("bot_sends_total", (("channel", "whatsapp"), ("outcome", "accepted"),
                                                                   ("error_code", "")))] == 1


def test_metrics_on_add_no_statement_and_no_store_call_to_a_request(metrics_app, monkeypatch):
    """The hot paths pay a clock reading and a histogram observation: the same statements as
    without metrics (tests/http/test_hot_path.py counts those), and the store is not touched."""
    client = metrics_app.test_client()
    seen = {"statements": 0, "store": 0}
    store = counters.store()
    monkeypatch.setattr(store, "add", lambda deltas: seen.__setitem__("store", seen["store"] + 1))
    monkeypatch.setattr(store, "totals", lambda: seen.__setitem__("store", seen["store"] + 1) or {})
    with metrics_app.app_context():
        make_contact("+15551234567")
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", lambda *a: seen.__setitem__("statements", seen["statements"] + 1))
    form = inbound_form("+15551234568")
    response = client.post("/twilio/webhook", data=form, base_url=PUBLIC_BASE,
                           headers={"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)})
    assert response.status_code == 200
    webhook_statements = seen["statements"]
    assert client.post("/notify", json={"to": "+15551234567", "body": "hi"},
                       headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 202
    notify_statements = seen["statements"] - webhook_statements
    postgres = engine.dialect.name == "postgresql"
    # tests/http/test_hot_path.py's figures: one statement each on PostgreSQL, two on SQLite.
    assert (webhook_statements, notify_statements) == ((1, 1) if postgres else (2, 2))
    assert seen["store"] == 0
