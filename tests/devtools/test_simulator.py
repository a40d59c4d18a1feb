"""Tests for bot.devtools.simulator, driven through the real twilio SDK over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from bot.devtools.simulator import SimulatorTimeout, TwilioSimulator, sign

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "sim-secret-token"
SANDBOX = "whatsapp:+14155238886"
USER = "whatsapp:+15551234567"


def make_client(sim: TwilioSimulator, token: str = AUTH_TOKEN, timeout: float = 5) -> Client:
    """A real SDK client whose API domain points at the simulator."""
    client = Client(ACCOUNT_SID, token, http_client=TwilioHttpClient(timeout=timeout))
    client.api.base_url = sim.url
    return client


class Receiver:
    """A tiny webhook endpoint (the bot's stand-in) that records each POST and checks its signature."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}/twilio/webhook"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _app(self, environ: dict, start_response: Any) -> Any:
        request = Request(environ)
        signature = request.headers.get("X-Twilio-Signature", "")
        post = {
            "url": request.url,
            "form": request.form.to_dict(),
            "valid": RequestValidator(AUTH_TOKEN).validate(request.url, request.form, signature),
            "valid_with_wrong_token": RequestValidator("wrong").validate(request.url, request.form, signature),
        }
        with self._cond:
            self.posts.append(post)
            self._cond.notify_all()
        return Response("<Response/>", mimetype="text/xml")(environ, start_response)

    def wait_for(self, count: int, timeout: float = 3.0) -> list[dict[str, Any]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.posts) >= count, timeout), self.posts
            return list(self.posts)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def sim(receiver: Receiver) -> Iterator[TwilioSimulator]:
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, webhook_url=receiver.url) as s:
        yield s


@pytest.fixture
def client(sim: TwilioSimulator) -> Client:
    return make_client(sim)


def test_create_is_accepted_and_recorded(sim: TwilioSimulator, client: Client, receiver: Receiver) -> None:
    msg = client.messages.create(to=USER, from_=SANDBOX, body="hi", status_callback=receiver.url)

    assert msg.sid.startswith("SM") and len(msg.sid) == 34
    assert (msg.status, msg.direction, msg.num_media, msg.error_code) == ("queued", "outbound-api", "0", None)
    assert msg.date_created is not None  # the SDK parsed our RFC 2822 date
    [stored] = sim.messages
    assert stored["sid"] == msg.sid
    assert stored["form"] == {"To": USER, "From": SANDBOX, "Body": "hi", "StatusCallback": receiver.url}
    assert "Authorization" not in sim.requests[0]["headers"]
    assert client.messages(msg.sid).fetch().body == "hi"


def test_media_and_content_template_arrive(sim: TwilioSimulator, client: Client) -> None:
    urls = ["https://example.com/a.png", "https://example.com/b.png"]
    media = client.messages.create(to=USER, from_=SANDBOX, media_url=urls)
    variables = json.dumps({"1": "Ann", "2": "12:00"})
    template = client.messages.create(to=USER, from_=SANDBOX, content_sid="HX" + "a" * 32, content_variables=variables)

    assert media.num_media == "2"
    first, second = sim.messages
    assert first["form"]["MediaUrl"] == urls
    assert second["form"]["ContentSid"] == "HX" + "a" * 32
    assert json.loads(second["form"]["ContentVariables"]) == {"1": "Ann", "2": "12:00"}
    assert template.sid == second["sid"]


def test_messaging_service_send_is_accepted_and_unknown_fields_ignored(sim: TwilioSimulator, client: Client) -> None:
    msg = client.messages.create(to=USER, messaging_service_sid="MG" + "2" * 32, body="x", validity_period=60,
                                 shorten_urls=True)
    assert msg.status == "accepted"
    assert sim.messages[0]["form"]["ValidityPeriod"] == "60"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"to": "whatsapp:+1", "body": "x"}, 400, 21211),
        ({"to": "+15551234567", "body": "x"}, 400, 21211),  # WhatsApp sender, SMS recipient
        ({"to": USER, "body": "x" * 1601}, 400, 21617),
        ({"to": USER}, 400, 21602),
        ({"to": USER, "content_sid": "HX" + "a" * 32, "content_variables": "[1, 2]"}, 400, 21656),
    ],
)
def test_invalid_sends_raise_twilio_rest_exception(
    sim: TwilioSimulator, client: Client, kwargs: dict, status: int, code: int
) -> None:
    with pytest.raises(TwilioRestException) as info:
        client.messages.create(from_=SANDBOX, **kwargs)
    assert (info.value.status, info.value.code) == (status, code)
    assert sim.messages == [] and len(sim.requests) == 1


def test_invalid_to_message_names_the_number(client: Client) -> None:
    with pytest.raises(TwilioRestException) as info:
        client.messages.create(to="whatsapp:+1", from_=SANDBOX, body="x")
    assert "The 'To' number whatsapp:+1 is not a valid phone number." in info.value.msg


def test_bad_token_is_rejected(sim: TwilioSimulator) -> None:
    with pytest.raises(TwilioRestException) as info:
        make_client(sim, token="wrong").messages.create(to=USER, from_=SANDBOX, body="x")
    assert (info.value.status, info.value.code) == (401, 20003)
    assert sim.messages == []


def test_fetch_unknown_sid_is_404(client: Client) -> None:
    with pytest.raises(TwilioRestException) as info:
        client.messages("SM" + "0" * 32).fetch()
    assert (info.value.status, info.value.code) == (404, 20404)


def test_fail_next_scripts_errors_then_recovers(sim: TwilioSimulator, client: Client) -> None:
    sim.fail_next(429, 20429, "Too Many Requests")
    with pytest.raises(TwilioRestException) as info:
        client.messages.create(to=USER, from_=SANDBOX, body="x")
    assert (info.value.status, info.value.code) == (429, 20429)

    client.messages.create(to=USER, from_=SANDBOX, body="x")
    assert len(sim.requests) == 2 and len(sim.messages) == 1


def test_hang_next_trips_the_sdk_timeout(sim: TwilioSimulator) -> None:
    sim.hang_next(3.0)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        make_client(sim, timeout=0.5).messages.create(to=USER, from_=SANDBOX, body="slow")
    assert time.monotonic() - started < 2.5
    # The hang was used up: the next send answers at once.
    assert make_client(sim, timeout=0.5).messages.create(to=USER, from_=SANDBOX, body="fast").sid.startswith("SM")


def test_wait_for_messages(sim: TwilioSimulator, client: Client) -> None:
    with pytest.raises(SimulatorTimeout):
        sim.wait_for_messages(1, timeout=0.05)
    threading.Timer(0.05, lambda: client.messages.create(to=USER, from_=SANDBOX, body="later")).start()
    assert sim.wait_for_messages(1, timeout=2)[0]["body"] == "later"


def test_reset_forgets_everything(sim: TwilioSimulator, client: Client) -> None:
    client.messages.create(to=USER, from_=SANDBOX, body="x")
    sim.fail_next(500, 20500)
    sim.reset()
    assert sim.messages == [] and sim.requests == []
    client.messages.create(to=USER, from_=SANDBOX, body="x")  # the scripted failure is gone too
    assert len(sim.messages) == 1


def test_send_inbound_posts_a_valid_signature(sim: TwilioSimulator, client: Client, receiver: Receiver) -> None:
    response = sim.send_inbound("+15559876543", "hello", profile_name="Ann", extra={"NumMedia": "1"})

    assert response.status_code == 200
    [post] = receiver.wait_for(1)
    assert post["valid"] and not post["valid_with_wrong_token"]
    form = post["form"]
    assert (form["From"], form["To"], form["Body"]) == ("whatsapp:+15559876543", SANDBOX, "hello")
    assert (form["WaId"], form["ProfileName"], form["NumMedia"]) == ("15559876543", "Ann", "1")
    assert form["MessageSid"].startswith("SM") and len(form["MessageSid"]) == 34
    assert form["AccountSid"] == ACCOUNT_SID and form["SmsStatus"] == "received"


def test_send_inbound_defaults_to_last_sender(sim: TwilioSimulator, client: Client, receiver: Receiver) -> None:
    client.messages.create(to=USER, from_="whatsapp:+15550001111", body="x")
    sim.send_inbound(USER, "reply")
    assert receiver.wait_for(1)[0]["form"]["To"] == "whatsapp:+15550001111"


def test_status_callback_is_signed_and_updates_status(
    sim: TwilioSimulator, client: Client, receiver: Receiver
) -> None:
    msg = client.messages.create(to=USER, from_=SANDBOX, body="x", status_callback=receiver.url)
    sim.send_status_callback(msg.sid, "undelivered", error_code=63016)

    [post] = receiver.wait_for(1)
    assert post["valid"]
    assert post["form"]["MessageSid"] == msg.sid
    assert (post["form"]["MessageStatus"], post["form"]["ErrorCode"], post["form"]["ChannelPrefix"]) == (
        "undelivered", "63016", "whatsapp")
    fetched = client.messages(msg.sid).fetch()
    assert (fetched.status, fetched.error_code) == ("undelivered", 63016)


def test_auto_callbacks_deliver_in_order(receiver: Receiver) -> None:
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, auto_callbacks=True, callback_delay=0.02) as sim:
        msg = make_client(sim).messages.create(to=USER, from_=SANDBOX, body="x", status_callback=receiver.url)
        posts = receiver.wait_for(3)
        assert [p["form"]["MessageStatus"] for p in posts] == ["sent", "delivered", "read"]
        assert all(p["valid"] and p["form"]["MessageSid"] == msg.sid for p in posts)
        assert sim.messages[0]["status"] == "read"


def test_sign_handles_repeated_fields() -> None:
    url = "https://example.com/hook"
    params = {"Body": "hi", "MediaUrl": ["https://a/1", "https://a/2"]}
    from werkzeug.datastructures import MultiDict

    form = MultiDict([("Body", "hi"), ("MediaUrl", "https://a/1"), ("MediaUrl", "https://a/2")])
    assert RequestValidator(AUTH_TOKEN).validate(url, form, sign(AUTH_TOKEN, url, params))
    assert sign(AUTH_TOKEN, url, params) != sign(AUTH_TOKEN, url, {"Body": "hi"})


def test_failing_numbers_get_sent_then_undelivered_with_the_code(receiver: Receiver) -> None:
    failing = "whatsapp:+15550000001"
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, auto_callbacks=True, callback_delay=0.02,
                         failing_numbers={"+15550000001": 30003}) as sim:
        make_client(sim).messages.create(to=failing, from_=SANDBOX, body="x", status_callback=receiver.url)
        posts = receiver.wait_for(2)
        assert [(p["form"]["MessageStatus"], p["form"].get("ErrorCode")) for p in posts] == \
            [("sent", None), ("undelivered", "30003")]
        assert sim.messages[0]["error_code"] == 30003


def test_account_fetch_checks_credentials(sim: TwilioSimulator) -> None:
    account = make_client(sim).api.v2010.accounts(ACCOUNT_SID).fetch()
    assert account.status == "active"
    with pytest.raises(TwilioRestException) as refused:
        make_client(sim, token="wrong").api.v2010.accounts(ACCOUNT_SID).fetch()
    assert (refused.value.status, refused.value.code) == (401, 20003)


def test_main_runs_with_development_secrets_and_stops_on_sigterm(tmp_path) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    from bot.devmode import dev_secrets

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}
    env.update(INSTANCE_PATH=str(tmp_path), SIMULATOR_PORT=str(port))
    process = subprocess.Popen([sys.executable, "-m", "bot.devtools.simulator"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        secrets = dev_secrets(str(tmp_path))  # the same file the simulator reads
        client = Client(secrets["TWILIO_ACCOUNT_SID"], secrets["TWILIO_AUTH_TOKEN"],
                        http_client=TwilioHttpClient(timeout=2))
        client.api.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                assert client.api.v2010.accounts(secrets["TWILIO_ACCOUNT_SID"]).fetch().status == "active"
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=10)[0]
    assert process.returncode == 0, output
    assert "stopped" in output


def test_main_refuses_bad_failure_rules_and_statuses_and_help_writes_nothing(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "INSTANCE_PATH"))}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bot.devtools.simulator", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)

    assert run("--help").returncode == 0
    assert list(tmp_path.iterdir()) == []  # --help created no instance/ in the current directory
    bad_number = run("--fail", "not-a-number=30003")
    assert bad_number.returncode == 2 and "--fail" in bad_number.stderr
    typo = run("--statuses", "sent,deliverd")
    assert typo.returncode == 2 and "deliverd" in typo.stderr and "delivered" in typo.stderr


def test_the_simulator_and_the_app_share_secrets_from_any_directory(tmp_path, monkeypatch) -> None:
    """Started from another directory, the simulator still finds the server's instance/."""
    from flask import Flask

    from bot.devmode import default_instance_path

    monkeypatch.delenv("INSTANCE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_instance_path() == Flask("bot").instance_path
    assert not default_instance_path().startswith(str(tmp_path))
    monkeypatch.setenv("INSTANCE_PATH", "relative/dir")
    assert default_instance_path() == str(tmp_path / "relative" / "dir")


def test_latency_delays_each_create_without_serialising_concurrent_ones() -> None:
    """latency= is the API's round trip: each create waits it out, concurrently with the others."""
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, latency=0.2) as slow:
        client = make_client(slow)
        started = time.perf_counter()
        client.messages.create(to=USER, from_=SANDBOX, body="one")
        assert time.perf_counter() - started >= 0.2

        durations: list[float] = []

        def create(body: str) -> None:
            began = time.perf_counter()
            make_client(slow).messages.create(to=USER, from_=SANDBOX, body=body)
            durations.append(time.perf_counter() - began)

        threads = [threading.Thread(target=create, args=(f"concurrent {i}",)) for i in range(4)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        # Serialised, four creates would need >= 0.8 s; overlapping, all finish near 0.2 s
        # (the bound leaves 0.4 s for thread start-up and connections on a busy machine).
        assert len(durations) == 4 and time.perf_counter() - began < 0.6
        timings = slow.timings
    assert [t["body"] for t in timings][0] == "one" and len(timings) == 5
    assert all(t["answered_at"] - t["received_at"] >= 0.19 for t in timings)


def test_webhooks_record_when_they_were_posted_and_how_long_they_took(
    sim: TwilioSimulator, receiver: Receiver
) -> None:
    sim.send_inbound(USER, "hello")
    [entry] = sim.webhooks
    assert entry["posted_at"] > 0 and 0 <= entry["duration"] < 5


def test_latency_ms_option_parses_and_defaults_to_zero(monkeypatch) -> None:
    from bot.devtools.simulator import parse_args

    monkeypatch.delenv("SIMULATOR_LATENCY_MS", raising=False)
    assert parse_args([]).latency_ms == 0
    assert parse_args(["--latency-ms", "150"]).latency_ms == 150
    with pytest.raises(SystemExit):
        parse_args(["--latency-ms", "-1"])
    with pytest.raises(ValueError):
        TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN, latency=-0.1)
