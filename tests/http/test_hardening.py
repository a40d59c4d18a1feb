"""Small holes found by trying the server from outside (issue 9, items 7 and 9), each closed here."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from bot.devmode import is_loopback_url
from bot.extensions import db
from bot.models import Conversation, Message, StatusEvent, new_id
from bot.vocabulary import ConversationStatus, Direction, MessageStatus, StartedBy
from tests.conftest import inbound_form, make_contact, status_form
from tests.http.test_webhook import sent_message, stored


@pytest.mark.parametrize("path", ["/messages/%00", "/conversations/%00", "/messages/" + "a" * 5000,
                                  "/conversations/ABC", "/messages/" + new_id() + "%0A"])
def test_an_id_that_cannot_be_ours_is_a_404_before_any_query(app, client, auth, path):
    """On PostgreSQL a NUL in the path used to reach the query and answer 500."""
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    with app.app_context():
        sa.event.listen(db.engine, "before_cursor_execute", count)
        try:
            response = client.get(path, headers=auth)
        finally:
            sa.event.remove(db.engine, "before_cursor_execute", count)
    assert response.status_code == 404
    assert response.get_json()["error"]
    assert statements == []


def test_an_unknown_id_of_the_right_shape_is_still_a_404(client, auth):
    assert client.get(f"/messages/{new_id()}", headers=auth).status_code == 404
    assert client.get(f"/conversations/{new_id()}", headers=auth).status_code == 404


def test_a_sid_with_a_trailing_newline_is_refused(app, post_webhook):
    """`$` matched before a final newline; the SID then reached PostgreSQL and failed there."""
    form = inbound_form()
    form["MessageSid"] = form["MessageSid"] + "\n"
    response = post_webhook(form)
    assert response.status_code == 400 and "MessageSid" in response.get_json()["error"]
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0


@pytest.mark.parametrize("url, local", [
    ("postgresql://u@127.0.0.1:5432/db", True),
    ("redis://localhost:6379/0", True),
    ("http://[::1]:8081", True),
    ("postgresql://u@127.db.example.com/prod", False),  # a name that starts like a loopback address
    ("postgresql://u@10.0.0.5/prod", False),
    ("redis://cache.internal:6379", False),
])
def test_loopback_urls_are_parsed_not_prefix_matched(url, local):
    assert is_loopback_url(url) is local


def test_a_second_final_status_of_the_same_rank_does_not_replace_the_first(app, client, auth, post_webhook):
    """`undelivered` and `failed` rank alike: the first one Twilio reported stays (strictly `<`)."""
    message_id, sid = sent_message(app, client, auth)
    assert post_webhook(status_form(sid, "undelivered", 30003)).status_code == 200
    assert post_webhook(status_form(sid, "failed", 30008)).status_code == 200
    row = stored(app, message_id)
    assert (row.status, row.error_code) == ("undelivered", 30003)
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(StatusEvent)) == 2  # both kept


def test_the_sweep_re_enqueues_unprocessed_inbound_and_starting_conversations(app):
    from datetime import timedelta

    from bot.clock import utcnow
    from bot.delivery import outbox
    from bot.delivery.queue import huey

    with app.app_context():
        contact = make_contact()
        long_ago = utcnow() - outbox.STALE_AFTER - timedelta(seconds=5)
        inbound = Message(direction=Direction.INBOUND, contact_id=contact.id, body="hi", twilio_sid="SM" + new_id(),
                          status=MessageStatus.RECEIVED, status_rank=0, created_at=long_ago, updated_at=long_ago)
        starting = Conversation(contact_id=contact.id, flow="feedback", state="start",
                                status=ConversationStatus.STARTING, started_by=StartedBy.BACKEND,
                                started_at=long_ago, updated_at=long_ago)
        db.session.add_all([inbound, starting])
        db.session.commit()
        inbound_id, starting_id = inbound.id, starting.id
        huey.flush()
        counts = outbox.sweep()
        assert (counts["inbound"], counts["conversations"]) == (1, 1)
    queued = []
    while (task := huey.dequeue()) is not None:
        queued.append((task.name.rsplit(".", 1)[-1], task.args[0]))
    assert sorted(queued) == sorted([("process_inbound", inbound_id), ("start_conversation", starting_id)])


def _placeholder(argument: str) -> str:
    return {"phone": "+15551234567"}.get(argument, new_id())


#: Routes anyone may call: Twilio's (verified by its signature instead), the health check and the
#: API's description (its shape only, no data).
#: Routes authenticated otherwise: Twilio's and SendGrid's signatures, the unsubscribe link's own
#: signed token (tests/delivery/test_email_delivery.py), or none (health, the API description).
PUBLIC_ENDPOINTS = {"webhook.twilio_webhook", "health.healthz", "openapi.openapi_json", "static",
                    "email_hooks.sendgrid_events", "email_hooks.unsubscribe"}
#: Routes behind an operator's sign-in instead of the token (bot/dashboard): they refuse the
#: token in tests/dashboard/test_security.py.
DASHBOARD_ENDPOINTS = "dashboard."


def needs_the_token(endpoint: str | None) -> bool:
    """Whether a route is the backend's API (bearer token), not public and not the dashboard's."""
    return endpoint not in PUBLIC_ENDPOINTS and not (endpoint or "").startswith(DASHBOARD_ENDPOINTS)


def test_every_backend_route_refuses_a_request_without_the_token(app, client):
    """Walks the app's URL map, so a route added later without @require_api_token fails here."""
    checked = []
    app.config["METRICS_TOKEN"] = "metrics-token"  # GET /metrics has a token of its own (else it is a 404)
    for rule in app.url_map.iter_rules():
        if not needs_the_token(rule.endpoint):
            continue
        path = rule.rule
        for argument in rule.arguments:
            path = path.replace(f"<{argument}>", _placeholder(argument))
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(path, method=method, json={})
            assert response.status_code == 401, f"{method} {rule.rule} answered {response.status_code} without a token"
            assert response.get_json()["error"]
            checked.append(f"{method} {rule.rule}")
    assert {"POST /notify", "PUT /contacts/<phone>/consent", "GET /messages/<message_id>"} <= set(checked)


def test_phone_numbers_are_masked_in_log_text():
    from bot.logmask import mask_phone

    assert mask_phone("reply to +15551234567 skipped") == "reply to +1555•••4567 skipped"
    assert mask_phone("whatsapp:+447700900123") == "whatsapp:+4477•••0123"
    assert mask_phone("PUT /contacts/%2B15551234567/consent HTTP/1.1") == "PUT /contacts/%2B1555•••4567/consent HTTP/1.1"
    assert mask_phone("message 0123456789abcdef took 12 ms") == "message 0123456789abcdef took 12 ms"


def test_our_log_lines_and_database_errors_carry_no_full_number(app):
    import logging

    from bot.logmask import MaskPhoneNumbers

    record = logging.LogRecord("bot.x", logging.INFO, __file__, 1, "reply %s to %s skipped", ("help", "+15551234567"), None)
    assert MaskPhoneNumbers().filter(record) and record.getMessage() == "reply help to +1555•••4567 skipped"
    with app.app_context():
        assert db.engine.hide_parameters  # an IntegrityError's text names no values


def test_the_access_log_masks_numbers_in_paths():
    from types import SimpleNamespace

    from gunicorn.config import Config

    from bot.gunicorn_logging import MaskingLogger

    logger = MaskingLogger(Config())
    request = SimpleNamespace(method="PUT", path="/contacts/+15551234567/consent", query="", uri="/contacts/+15551234567/consent",
                              version=(1, 1), headers=[])
    response = SimpleNamespace(status="200 OK", sent=10, headers=[], status_code=200)
    environ = {"REQUEST_METHOD": "PUT", "RAW_URI": "/contacts/+15551234567/consent", "SERVER_PROTOCOL": "HTTP/1.1",
               "PATH_INFO": "/contacts/+15551234567/consent", "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1"}
    import datetime

    atoms = logger.atoms(response, request, environ, datetime.timedelta(milliseconds=3))
    assert "+15551234567" not in atoms["r"] and "+1555•••4567" in atoms["r"]
    assert "+15551234567" not in atoms["U"]
