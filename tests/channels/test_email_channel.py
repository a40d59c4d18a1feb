"""The email channel's send path over real HTTP: the official sendgrid SDK against the simulator.

Every outcome class SendGrid can answer (docs/ARCHITECTURE.md, "Email channel (pieces)"): 202,
400, 401 (bad key and "Maximum credits exceeded"), 403, 429, 5xx, 502/504, a timeout, a refused
connection, a dropped answer. Nothing here mocks the SDK: `build_client` points it at the
simulator's URL exactly as SENDGRID_API_URL does.
"""
from __future__ import annotations

import logging
import socket
from datetime import datetime, timezone

import pytest
from sendgrid import SendGridAPIClient

from bot.channels.email.client import build_client
from bot.channels.email.mail import InvalidMail, build_mail, parse_address
from bot.channels.email.sending import error_text, send
from bot.channels.outcomes import Accepted, Failed, Unknown
from bot.devtools.sendgrid_simulator import NO_CREDITS, SendGridSimulator
from bot.devtools.simulator import TwilioSimulator

FROM = "Acme Alerts <alerts@acme.example>"
UNSUBSCRIBE = "https://bot.example.test/unsubscribe/abc.def"
STARTED = datetime(2025, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def sendgrid(twilio: TwilioSimulator) -> SendGridSimulator:
    twilio.sendgrid.reset()
    yield twilio.sendgrid
    twilio.sendgrid.reset()
    twilio.sendgrid.verified_senders = None


@pytest.fixture
def client(twilio: TwilioSimulator, sendgrid: SendGridSimulator) -> SendGridAPIClient:
    return build_client(sendgrid.api_key, twilio.url, timeout=2)


def a_mail(message_id: str = "msg-1", **overrides) -> dict:
    fields = dict(message_id=message_id, to_email="ada@example.com", to_name="Ada", from_=FROM,
                  subject="New sign-in", text="Hello\n", html="<p>Hello</p>", unsubscribe_url=UNSUBSCRIBE)
    fields.update(overrides)
    return build_mail(**fields)


# ------------------------------------------------------------------ 202


def test_an_accepted_email_carries_our_id_and_the_one_click_headers(client, sendgrid):
    outcome = send(client, a_mail("msg-42"), STARTED)

    [email] = sendgrid.wait_for_emails(1)
    assert outcome == Accepted(email["x_message_id"], "accepted")
    assert email["to"] == "ada@example.com" and email["to_name"] == "Ada"
    assert (email["from"], email["from_name"]) == ("alerts@acme.example", "Acme Alerts")
    assert email["subject"] == "New sign-in"
    assert (email["text"], email["html"]) == ("Hello\n", "<p>Hello</p>")
    assert email["custom_args"] == {"message_id": "msg-42"}
    assert email["headers"]["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert email["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # text/plain first (SendGrid refuses the other order).
    assert [block["type"] for block in email["body"]["content"]] == ["text/plain", "text/html"]


def test_neither_the_api_key_nor_the_address_reaches_the_log(client, sendgrid, caplog):
    """python_http_client logs each request's headers and payload at DEBUG; build_client quiets it."""
    caplog.set_level(logging.DEBUG)
    assert isinstance(send(client, a_mail(), STARTED), Accepted)
    assert sendgrid.api_key not in caplog.text and "ada@example.com" not in caplog.text


def test_a_text_only_email_has_one_content_block(client, sendgrid):
    assert isinstance(send(client, a_mail(html=None), STARTED), Accepted)
    assert [block["type"] for block in sendgrid.wait_for_emails(1)[0]["body"]["content"]] == ["text/plain"]


# ------------------------------------------------------------------ refusals: 400, 401, 403


def test_a_400_fails_for_good_with_sendgrids_message(client, sendgrid):
    body = a_mail()
    body["content"].reverse()  # text/html before text/plain: SendGrid's validation refuses it

    outcome = send(client, body, STARTED)

    assert isinstance(outcome, Failed)
    assert (outcome.code, outcome.http_status, outcome.retry, outcome.hold) == (400, 400, False, False)
    assert "text/plain content must be first" in outcome.text and "(content)" in outcome.text
    assert sendgrid.emails == []


def test_a_bad_api_key_holds_the_message(twilio, sendgrid):
    outcome = send(build_client("SG.wrong", twilio.url, timeout=2), a_mail(), STARTED)

    assert outcome == Failed(401, "The provided authorization grant is invalid, expired, or revoked", retry=True,
                             http_status=401, hold=True)


def test_maximum_credits_exceeded_is_a_401_that_holds_then_the_retry_goes_through(client, sendgrid):
    sendgrid.fail_next(401, NO_CREDITS)

    first = send(client, a_mail(), STARTED)
    second = send(client, a_mail(), STARTED)  # credits are back

    assert first == Failed(401, NO_CREDITS, retry=True, http_status=401, hold=True)
    assert isinstance(second, Accepted)
    assert len(sendgrid.emails) == 1


def test_an_unverified_sender_is_a_403_that_fails_for_good(client, sendgrid):
    sendgrid.verified_senders = {"someone-else@acme.example"}

    outcome = send(client, a_mail(), STARTED)

    assert isinstance(outcome, Failed)
    assert (outcome.code, outcome.retry, outcome.hold) == (403, False, False)
    assert outcome.text.startswith("The from address does not match a verified Sender Identity")


# ------------------------------------------------------------------ retry: 429, 500, 503


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_are_retried(client, sendgrid, status):
    sendgrid.fail_next(status, "try later")

    outcome = send(client, a_mail(), STARTED)

    assert outcome == Failed(status, "try later", retry=True, http_status=status)
    assert sendgrid.emails == []


# ------------------------------------------------------------------ may have been accepted


@pytest.mark.parametrize("status", [502, 504])
def test_a_502_or_504_from_a_proxy_is_unknown(client, sendgrid, status):
    sendgrid.lose_answer_next(status)

    outcome = send(client, a_mail(), STARTED)

    assert isinstance(outcome, Unknown)
    assert (outcome.http_status, outcome.since) == (status, STARTED)
    assert len(sendgrid.emails) == 1  # it was sent: resending blind would duplicate it


def test_a_connection_dropped_after_the_request_is_unknown(client, sendgrid):
    sendgrid.lose_answer_next("drop")

    outcome = send(client, a_mail(), STARTED)

    assert isinstance(outcome, Unknown) and outcome.http_status is None
    assert len(sendgrid.emails) == 1


def test_the_client_times_out_and_the_hung_send_is_unknown(twilio, sendgrid):
    """SendGridAPIClient.send() passes no timeout; build_client sets python_http_client's. A send
    whose answer is late past it is Unknown (the mail was taken), not an answer waited for."""
    sendgrid.hang_next(4)

    outcome = send(build_client(sendgrid.api_key, twilio.url, timeout=0.5), a_mail(), STARTED)

    assert isinstance(outcome, Unknown), outcome
    assert "TimeoutError" in outcome.reason
    assert len(sendgrid.emails) == 1


def test_the_sdk_alone_waits_out_a_slow_answer(twilio, sendgrid):
    """The fact build_client exists for: a bare SendGridAPIClient has no timeout, so it waits for a
    hung answer however long it takes (here 1.5 s, where build_client's 0.5 s would give up)."""
    bare = SendGridAPIClient(sendgrid.api_key, host=twilio.url)
    assert bare.client.timeout is None
    sendgrid.hang_next(1.5)

    assert isinstance(send(bare, a_mail(), STARTED), Accepted)


def test_a_refused_connection_never_reached_sendgrid_and_is_retried(sendgrid):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    outcome = send(build_client(sendgrid.api_key, f"http://127.0.0.1:{port}", timeout=2), a_mail(), STARTED)

    assert isinstance(outcome, Failed)
    assert (outcome.retry, outcome.hold, outcome.http_status, outcome.code) == (True, False, None, None)
    assert "ConnectionRefusedError" in outcome.text


def test_an_unusable_api_url_holds(sendgrid):
    outcome = send(build_client(sendgrid.api_key, "api.sendgrid.com", timeout=2), a_mail(), STARTED)

    assert isinstance(outcome, Failed) and outcome.hold and outcome.retry


# ------------------------------------------------------------------ building the mail


@pytest.mark.parametrize("value, expected", [
    ("Acme <alerts@acme.example>", ("alerts@acme.example", "Acme")),
    ('"Acme, Inc." <alerts@acme.example>', ("alerts@acme.example", "Acme, Inc.")),
    ("alerts@acme.example", ("alerts@acme.example", None)),
])
def test_email_from_is_parsed_with_email_utils(value, expected):
    assert parse_address(value) == expected


@pytest.mark.parametrize("field, value", [
    ("from_", "Acme"), ("from_", ""), ("to_email", "not-an-address"), ("to_email", "a b@example.com"),
    ("unsubscribe_url", "https://x.example/u>\r\nBcc: evil@example.com"), ("unsubscribe_url", "javascript:x"),
    ("subject", "  "), ("text", ""),
])
def test_an_unusable_field_is_refused_before_sendgrid(field, value):
    with pytest.raises(InvalidMail):
        a_mail(**{field: value})


def test_a_subject_is_one_line_and_custom_args_are_strings():
    body = a_mail(message_id=12345, subject="New\r\nsign-in")
    assert body["subject"] == "New sign-in"
    assert body["custom_args"] == {"message_id": "12345"}


@pytest.mark.parametrize("body, text", [
    (b'{"errors": [{"message": "Bad things", "field": "from", "help": null}]}', "Bad things (from)"),
    (b'{"errors": [{"message": "No field", "field": null}]}', "No field"),
    (b"<html>502</html>", None), (b"", None), (b'{"errors": []}', None), (b'[1]', None),
])
def test_sendgrids_error_text(body, text):
    assert error_text(body) == text
