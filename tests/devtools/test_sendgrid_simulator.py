"""The simulator's SendGrid side: mail/send as SendGrid validates it, and signed event batches
posted over real HTTP to a receiver that checks them with bot/channels/email/signature.py."""
from __future__ import annotations

import json
import threading
from typing import Any, Iterator

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from bot.channels.email.client import build_client
from bot.channels.email.mail import build_mail
from bot.channels.email.signature import load_public_key, verify
from bot.channels.email.webhook_events import parse_batch
from bot.devtools.sendgrid_simulator import SendGridSimulator, dev_api_key
from bot.devtools.simulator import TwilioSimulator
from bot.vocabulary import MessageStatus

from tests.conftest import AUTH_TOKEN


class Receiver:
    """A stand-in for the bot's /sendgrid/events: verifies each POST over its raw body."""

    def __init__(self, public_key: str) -> None:
        self.key = load_public_key(public_key)
        self.batches: list[tuple[bool, list[Any]]] = []
        self.cond = threading.Condition()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/sendgrid/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def app(self, environ, start_response):
        request = Request(environ)
        body = request.get_data()
        ok = verify(self.key, request.headers, body).ok
        with self.cond:
            self.batches.append((ok, parse_batch(body)))
            self.cond.notify_all()
        return Response(status=200 if ok else 403)(environ, start_response)

    def wait(self, count: int, timeout: float = 20) -> list[tuple[bool, list[Any]]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.batches) >= count, timeout), self.batches
            return list(self.batches)


@pytest.fixture
def sendgrid(twilio: TwilioSimulator) -> Iterator[SendGridSimulator]:
    twilio.sendgrid.reset()
    yield twilio.sendgrid
    twilio.sendgrid.reset()
    twilio.sendgrid.events_url = None
    twilio.sendgrid.bouncing = {}


@pytest.fixture
def receiver(sendgrid: SendGridSimulator) -> Iterator[Receiver]:
    receiver = Receiver(sendgrid.public_key)
    sendgrid.events_url = receiver.url
    yield receiver
    receiver.server.shutdown()


def mail(message_id: str = "m1", to: str = "ada@example.com") -> dict:
    return build_mail(message_id=message_id, to_email=to, to_name=None, from_="Acme <a@acme.example>",
                      subject="Hi", text="Hello", html=None, unsubscribe_url="https://bot.example.test/u/t")


def post(twilio: TwilioSimulator, body: Any, key: str | None = None) -> requests.Response:
    return requests.post(twilio.url + "/v3/mail/send", json=body,
                         headers={"Authorization": f"Bearer {key or twilio.sendgrid.api_key}"}, timeout=5)


def test_the_default_key_is_derived_from_the_auth_token(twilio):
    assert twilio.sendgrid.api_key == dev_api_key(AUTH_TOKEN) and twilio.sendgrid.api_key.startswith("SG.")


def test_each_accepted_email_gets_signed_processed_then_delivered_events(twilio, sendgrid, receiver):
    client = build_client(sendgrid.api_key, twilio.url, timeout=5)
    client.send(mail("m-7"))

    batches = receiver.wait(2)

    assert all(ok for ok, _ in batches)
    events = [event for _, batch in batches for event in batch]
    assert [(e.event, e.status, e.message_id) for e in events] == [
        ("processed", MessageStatus.ACCEPTED, "m-7"), ("delivered", MessageStatus.DELIVERED, "m-7")]
    [email] = sendgrid.emails
    assert all(e.sg_message_id.startswith(email["x_message_id"] + ".") for e in events)
    assert len({e.sg_event_id for e in events}) == 2
    assert [p["status_code"] for p in sendgrid.wait_for_event_posts(2)] == [200, 200]


def test_a_bouncing_address_gets_a_bounce_with_its_reason(twilio, sendgrid, receiver):
    sendgrid.bouncing = {"gone@example.com": "550 5.1.1 The email account does not exist"}
    build_client(sendgrid.api_key, twilio.url, timeout=5).send(mail("m-8", to="gone@example.com"))

    events = [event for _, batch in receiver.wait(2) for event in batch]

    assert [(e.event, e.status) for e in events] == [("processed", MessageStatus.ACCEPTED),
                                                     ("bounce", MessageStatus.FAILED)]
    assert events[1].reason == "550 5.1.1 The email account does not exist"


def test_post_events_signs_any_batch_and_a_stale_one_is_refused(twilio, sendgrid, receiver):
    sendgrid.auto_events = False
    try:
        build_client(sendgrid.api_key, twilio.url, timeout=5).send(mail("m-9"))
        [email] = sendgrid.wait_for_emails(1)
        unsubscribe = sendgrid.event(email, "unsubscribe")

        assert sendgrid.post_events([unsubscribe]).status_code == 200
        assert sendgrid.post_events([unsubscribe], timestamp=1_000_000_000).status_code == 403
    finally:
        sendgrid.auto_events = True
    [(ok, [event]), (stale_ok, _)] = receiver.wait(2)
    assert ok and not stale_ok
    assert (event.opt_out, event.message_id, event.email) == (True, "m-9", "ada@example.com")


def test_no_events_without_an_events_url(twilio, sendgrid):
    build_client(sendgrid.api_key, twilio.url, timeout=5).send(mail())
    sendgrid.wait_for_emails(1)
    assert sendgrid.event_posts == []


@pytest.mark.parametrize("change, status, field", [
    (lambda b: b.pop("personalizations"), 400, "personalizations"),
    (lambda b: b["personalizations"][0]["to"][0].update(email="nope"), 400, "personalizations.0.to.0.email"),
    (lambda b: b["personalizations"][0].update(to=[{"email": f"u{i}@x.example"} for i in range(1001)]), 400,
     "personalizations"),
    (lambda b: b.pop("from"), 400, "from"),
    (lambda b: b.pop("subject"), 400, "subject"),
    (lambda b: b.pop("content"), 400, "content"),
    (lambda b: b["content"].insert(0, {"type": "text/html", "value": "<p>x</p>"}), 400, "content"),
    (lambda b: b["custom_args"].update(n=1), 400, "custom_args"),
    (lambda b: b["custom_args"].update(big="x" * 10_001), 400, "custom_args"),
])
def test_mail_send_validates_the_body_as_sendgrid_does(twilio, sendgrid, change, status, field):
    body = mail()
    change(body)

    answer = post(twilio, body)

    assert answer.status_code == status
    [error] = answer.json()["errors"]
    assert error["field"] == field and error["message"]
    assert sendgrid.emails == [] and sendgrid.attempts[-1]["status"] == status


def test_a_wrong_key_is_a_401_and_the_key_is_never_recorded(twilio, sendgrid):
    answer = post(twilio, mail(), key="SG.nope")
    assert answer.status_code == 401 and answer.json()["errors"][0]["message"].startswith("The provided authorization")
    assert "Authorization" not in sendgrid.attempts[-1]["headers"]


def test_a_202_has_an_empty_body_and_an_x_message_id(twilio, sendgrid):
    answer = post(twilio, mail())
    assert (answer.status_code, answer.content) == (202, b"")
    assert answer.headers["X-Message-Id"] == sendgrid.emails[0]["x_message_id"]


def test_sandbox_mode_answers_200_and_sends_nothing(twilio, sendgrid):
    body = mail()
    body["mail_settings"] = {"sandbox_mode": {"enable": True}}
    assert post(twilio, body).status_code == 200
    assert sendgrid.emails == []


def test_other_v3_paths_are_sendgrid_404s_and_twilio_is_untouched(twilio, sendgrid):
    answer = requests.get(twilio.url + "/v3/user/profile", timeout=5)
    assert answer.status_code == 404 and "errors" in answer.json()
    assert twilio.requests == [] or all(not r["path"].startswith("/v3/") for r in twilio.requests)


def test_wait_for_emails_names_what_arrived(sendgrid):
    with pytest.raises(AssertionError, match="got 0"):
        sendgrid.wait_for_emails(1, timeout=0.1)


def test_a_body_of_json_that_is_not_an_object_is_a_400(twilio, sendgrid):
    answer = requests.post(twilio.url + "/v3/mail/send", data=json.dumps([1]),
                           headers={"Authorization": f"Bearer {sendgrid.api_key}"}, timeout=5)
    assert answer.status_code == 400
