"""Development mode needs no SendGrid account (issue 16, item 8).

With no SENDGRID_API_KEY, development mode sends email to the simulator's SendGrid side with a
key derived from the development auth token, and verifies the events the simulator posts back
with the public half of a key pair derived from the same token; `bin/dev` wires the simulator
to the web's /sendgrid/events, and a newcomer sees the login email arrive in `flask chat`
(`/emails`) or on the simulator's page (`/_emails`). The last test runs `bin/dev` itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from bot.channels.email.client import build_client
from bot.channels.email.mail import build_mail
from bot.channels.email.signature import load_public_key, verify
from bot.config import load_settings, missing_secrets
from bot.devmode import (DEV_EMAIL_FROM, dev_api_key, dev_private_key, dev_secrets, public_key_text, simulator_url,
                         with_dev_defaults)
from bot.devtools.chat import ChatSession, run_repl
from bot.devtools.simulator import TwilioSimulator, parse_args
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, SENDER
from tests.devtools.test_bin_dev import (bin_dev_env, descendants, kill_what_is_left, press_ctrl_c, start_bin_dev,
                                        wait_until_answering)
from tests.faults.test_processes import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


# --- the settings --------------------------------------------------------------------------------

def test_development_mode_sends_email_to_the_simulator_with_derived_keys(tmp_path):
    settings = with_dev_defaults(load_settings({"INSTANCE_PATH": str(tmp_path)}, env_file=None), str(tmp_path))
    token = dev_secrets(str(tmp_path))["TWILIO_AUTH_TOKEN"]
    assert settings.sendgrid_api_key.get_secret_value() == dev_api_key(token)
    assert settings.sendgrid_api_url == simulator_url()
    assert settings.email_from == DEV_EMAIL_FROM
    assert missing_secrets(settings) == []  # EMAIL_FROM and SECRET_KEY come with the key

    # The simulator, started apart with only the auth token, signs what the server verifies.
    simulator = TwilioSimulator(ACCOUNT_SID, token)
    assert simulator.sendgrid.api_key == settings.sendgrid_api_key.get_secret_value()
    body = b'[{"event": "processed", "sg_event_id": "e1"}]'
    key = load_public_key(settings.sendgrid_webhook_public_key)
    assert verify(key, simulator.sendgrid.signed_headers(body), body).ok
    # ... and a key derived from another token does not verify it.
    other = load_public_key(public_key_text(dev_private_key(token + "x")))
    assert not verify(other, simulator.sendgrid.signed_headers(body), body).ok


def test_a_sendgrid_key_of_your_own_keeps_every_email_setting_as_given(tmp_path):
    given = load_settings({"INSTANCE_PATH": str(tmp_path), "SENDGRID_API_KEY": "SG.mine",
                           "EMAIL_FROM": "Me <me@example.org>"}, env_file=None)
    settings = with_dev_defaults(given, str(tmp_path))
    assert settings.sendgrid_api_key.get_secret_value() == "SG.mine"
    assert settings.sendgrid_api_url == "https://api.sendgrid.com"  # not the simulator, which would refuse it
    assert settings.email_from == "Me <me@example.org>"
    assert settings.sendgrid_webhook_public_key is None


# --- the simulator's command line ----------------------------------------------------------------

def test_the_simulator_posts_email_events_to_the_webs_sendgrid_route(monkeypatch):
    monkeypatch.delenv("TWILIO_WEBHOOK_URL", raising=False)
    monkeypatch.setenv("DEV_WEB_URL", "http://127.0.0.1:5123")
    args = parse_args(["--bounce", "Gone@Example.com", "--bounce", "full@example.com=dropped: Bounced Address"])
    assert args.webhook_url == "http://127.0.0.1:5123/twilio/webhook"
    assert args.sendgrid_events_url == "http://127.0.0.1:5123/sendgrid/events"
    assert args.email_events is True
    assert args.bouncing["gone@example.com"].startswith("550")
    assert args.bouncing["full@example.com"] == "dropped: Bounced Address"
    given = parse_args(["--webhook-url", "http://localhost:7000/twilio/webhook#rc=3"])
    assert given.sendgrid_events_url == "http://localhost:7000/sendgrid/events"
    assert parse_args(["--no-email-events"]).email_events is False


@pytest.mark.parametrize("argv", [["--bounce", "not-an-address"], ["--sendgrid-events-url", "ftp://x/y"]])
def test_the_simulator_refuses_bad_email_options(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


# --- what a newcomer looks at: the page and the chat ---------------------------------------------

def send_email(simulator: TwilioSimulator, subject: str, text: str, html: str | None = None) -> None:
    """One email through the real SendGrid SDK to the simulator, as the worker sends it."""
    client = build_client(simulator.sendgrid.api_key, simulator.url, timeout=5)
    mail = build_mail(message_id="m" * 32, to_email="ada@example.com", to_name="Ada", from_=DEV_EMAIL_FROM,
                      subject=subject, text=text, html=html, unsubscribe_url="http://127.0.0.1:5000/unsubscribe/t")
    assert client.send(mail).status_code == 202


def test_the_simulator_lists_the_emails_it_received_as_json_and_as_a_page():
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN) as simulator:
        url = simulator.url + "/_emails"
        assert requests.get(url, timeout=5).json() == {"emails": []}
        assert "No email yet" in requests.get(url, headers={"Accept": "text/html"}, timeout=5).text
        send_email(simulator, "New sign-in <b>now</b>", "Hi Ada,\nSomeone signed in.", "<p onclick=x>Hi</p>")
        [email] = requests.get(url, timeout=5).json()["emails"]
        assert (email["to"], email["from"], email["subject"]) == ("ada@example.com", "bot@example.com",
                                                                  "New sign-in <b>now</b>")
        assert email["message_id"] == "m" * 32 and email["text"] == "Hi Ada,\nSomeone signed in."
        assert email["events"] == []  # nobody to post them to
        page = requests.get(url, headers={"Accept": "text/html,application/xhtml+xml"}, timeout=5)
        assert page.headers["Content-Type"].startswith("text/html")
        # Escaped, and the email's own markup only inside a sandboxed frame.
        assert "New sign-in &lt;b&gt;now&lt;/b&gt;" in page.text and "<b>now</b>" not in page.text
        assert 'sandbox=""' in page.text and "<p onclick" not in page.text


def test_the_chat_shows_each_new_email_and_prints_them_with_slash_emails():
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN) as simulator:
        send_email(simulator, "Sent before the chat began", "old")
        chat = ChatSession(phone="+15551239999", profile_name="Ada", webhook_url="http://127.0.0.1:9/twilio/webhook",
                           auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, bot_number=SENDER,
                           client=_twilio_client(simulator), emails_url=simulator.url + "/_emails")
        assert chat.poll() == []  # an email from before the session is not news
        send_email(simulator, "New sign-in to your account", "Hi Ada,\n\nSomeone just signed in.")
        [event] = chat.poll()
        assert event.kind == "email" and event.to == "ada@example.com"
        assert event.render() == "📧 email to ada@example.com: New sign-in to your account   (/emails shows it)"
        assert chat.poll() == []  # shown once

        output: list[str] = []
        lines = ["/emails", "/emails 1", "/emails x", "/quit"]
        run_repl(chat, read_line=lambda prompt: lines.pop(0), write=output.append, watch_interval=None)
        text = "\n".join(output)
        assert text.count("Subject: Sent before the chat began") == 1  # /emails lists all; /emails 1 the last
        assert text.count("Subject: New sign-in to your account") == 2
        assert "   | Someone just signed in." in text and "usage: /emails [N]" in text


def test_outside_development_mode_the_chat_has_no_emails_to_show():
    with TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN) as simulator:
        chat = ChatSession(phone="+15551239998", profile_name=None, webhook_url="http://127.0.0.1:9/twilio/webhook",
                           auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, bot_number=SENDER,
                           client=_twilio_client(simulator))
        send_email(simulator, "Not shown", "x")
        assert chat.poll() == []
        output: list[str] = []
        run_repl(chat, read_line=lambda prompt: "/emails" if not output else "/quit", write=output.append,
                 watch_interval=None)
        assert "development mode only" in output[0]


def _twilio_client(simulator: TwilioSimulator) -> Client:
    """The official SDK pointed at the simulator (as the chat's own client is in development mode)."""
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=TwilioHttpClient(timeout=5))
    client.api.base_url = simulator.url
    return client


# --- the whole thing: bin/dev, then the README's first example -----------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "honcho").exists(), reason="needs honcho (the test extra has it)")
def test_bin_dev_delivers_the_login_email_and_the_chat_shows_it(tmp_path):
    """bin/dev with no configuration at all; PUT /users/123, POST /notify {"user_id": "123",
    "template": "login"}: the email reaches the simulator, its signed events reach the web (the
    message ends `delivered`), and `bin/chat`'s /emails and the /_emails page show it."""
    web_port, simulator_port = free_port(), free_port()
    instance = tmp_path / "instance"
    env = bin_dev_env(tmp_path, web_port, simulator_port, SIMULATOR_ARGS="--callback-delay 0.2")
    shell = start_bin_dev("bin/dev", env, tmp_path, tmp_path / "dev.log")
    web, simulator = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{simulator_port}"
    started: dict[int, str] = {}
    try:
        wait_until_answering(shell, started, web + "/healthz", simulator + "/_emails")
        started.update(descendants(shell.pid))
        token = json.loads((instance / "dev-secrets.json").read_text())["NOTIFY_API_TOKEN"]
        auth = {"Authorization": f"Bearer {token}"}

        user = requests.put(web + "/users/123", headers=auth, timeout=10, json={
            "phone": "+15551234567", "email": "ada@example.com", "name": "Ada", "channels": ["email", "whatsapp"]})
        assert user.status_code in (200, 201), user.text
        sent = requests.post(web + "/notify", headers=auth, timeout=10,
                             json={"user_id": "123", "template": "login", "variables": {"device": "Firefox on Linux"}})
        assert sent.status_code == 202, sent.text
        message_id = sent.json()["id"]

        def emailed() -> dict | None:
            emails = requests.get(simulator + "/_emails", timeout=5).json()["emails"]
            return next((e for e in emails if e["message_id"] == message_id and "delivered" in e["events"]), None)

        email = wait_until(emailed, timeout=60, what="the login email and its delivered event, answered 2xx by the web")
        assert email["to"] == "ada@example.com" and email["subject"] == "New sign-in to your account"
        assert "Firefox on Linux" in email["text"] and email["from"] == "bot@example.com"

        def delivered() -> dict | None:
            answer = requests.get(f"{web}/messages/{message_id}", headers=auth, timeout=5).json()
            return answer if answer["status"] == "delivered" else None

        message = wait_until(delivered, timeout=60, what="GET /messages/<id> to say delivered (signed events applied)")
        assert message["channel"] == "email"
        assert {"processed", "delivered"} <= {event["status"] for event in message["events"]}

        chat = subprocess.run([str(ROOT / "bin" / "chat"), "--as", "+15551234567", "--name", "Ada"],
                              input="/emails\n/quit\n", capture_output=True, text=True, timeout=120,
                              env={**env, "DEV_WEB_URL": web})
        assert chat.returncode == 0, chat.stdout + chat.stderr
        assert "Subject: New sign-in to your account" in chat.stdout and "to ada@example.com" in chat.stdout
        assert "| Someone just signed in to your account from Firefox on Linux." in chat.stdout
        page = requests.get(simulator + "/_emails", headers={"Accept": "text/html"}, timeout=5).text
        assert "New sign-in to your account" in page and "delivered" in page

        left = press_ctrl_c(shell, started)
        assert not left, f"still running after Ctrl-C: {left}"
    finally:
        kill_what_is_left(shell, started)
