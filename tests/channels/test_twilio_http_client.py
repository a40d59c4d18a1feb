"""The HTTP layer under the Twilio SDK (bot/channels/whatsapp/client.py): urllib3 directly, the
SDK's own requests on the wire.

Each request the worker makes (create with text, media and a template's variables; the lookup's
list; the reconciler's fetch) is sent once through the SDK's own `requests`-based client and once
through ours, to a real HTTP server that records the bytes: method, path, query, body and the
headers Twilio reads must be the same. Proxies and errors are exercised on real sockets too.
"""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import urllib3
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from bot.channels.outcomes import Accepted, Failed, Unknown
from bot.channels.whatsapp import sending
from bot.channels.whatsapp.client import build_client, form_encode
from bot.channels.whatsapp.errors import request_never_left
from bot.clock import utcnow

SID = "AC" + "0f" * 16
TOKEN = "wire-token"
MESSAGE = {"sid": "SM" + "1" * 32, "status": "queued", "body": "hi", "to": "whatsapp:+15551234567",
           "from": "whatsapp:+14155238886", "date_created": "Sun, 06 Dec 2026 20:00:00 +0000"}


class Recorder(ThreadingHTTPServer):
    """Answers every request like Twilio would (a message, or a page of them) and keeps it."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.status = 201
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append({"method": self.command, "target": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                 "body": body})
        if "/Messages.json" in self.path and self.command == "GET":
            payload = {"messages": [MESSAGE], "next_page_uri": None, "page": 0, "page_size": 50}
        else:
            payload = MESSAGE
        if self.server.status >= 400:
            payload = {"code": 21211, "message": "The 'To' number is not valid.", "status": self.server.status}
        data = json.dumps(payload).encode()
        self.send_response(self.server.status if self.server.status >= 400 or self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def sdk_client(url: str) -> Client:
    client = Client(SID, TOKEN, http_client=TwilioHttpClient(timeout=5))
    client.api.base_url = url
    return client


CALLS = {
    "text": lambda c: c.messages.create(to="whatsapp:+15551234567", from_="whatsapp:+14155238886",
                                        body="Ünïcode & spaces + plus/slash=eq ✓", status_callback="http://x/cb?a=1"),
    "media": lambda c: c.messages.create(to="whatsapp:+15551234567", from_="whatsapp:+14155238886",
                                         media_url=["https://e.x/a.jpg", "https://e.x/b c.png"]),
    "template": lambda c: c.messages.create(to="whatsapp:+15551234567", from_="whatsapp:+14155238886",
                                            content_sid="HX" + "2" * 32,
                                            content_variables=json.dumps({"1": "Zoë", "2": "12:30"})),
    "list": lambda c: list(c.messages.list(to="whatsapp:+15551234567", from_="whatsapp:+14155238886", limit=50)),
    "fetch": lambda c: c.messages("SM" + "3" * 32).fetch(),
}

#: Headers Twilio reads; requests' transport headers (Accept-Encoding, Connection) are sent too.
COMPARED = ("Authorization", "Content-Type", "Content-Length", "User-Agent", "X-Twilio-Client", "Accept",
            "Accept-Charset", "Accept-Encoding", "Connection", "Host")


@pytest.mark.parametrize("call", sorted(CALLS))
def test_the_sdk_sends_the_same_bytes_through_urllib3_as_through_requests(recorder, call):
    theirs = CALLS[call](sdk_client(recorder.url))
    ours = CALLS[call](build_client(SID, TOKEN, recorder.url, 5))
    assert len(recorder.seen) == 2
    by_requests, by_urllib3 = recorder.seen
    assert by_urllib3["method"] == by_requests["method"]
    assert by_urllib3["target"] == by_requests["target"]
    assert by_urllib3["body"] == by_requests["body"]
    compared = [h.lower() for h in COMPARED]
    assert {h: by_urllib3["headers"].get(h) for h in compared} == {h: by_requests["headers"].get(h) for h in compared}
    assert by_urllib3["headers"]["authorization"].startswith("Basic ")
    # And the SDK parsed the same answer from both.
    if call == "list":
        assert [m.sid for m in ours] == [m.sid for m in theirs] == [MESSAGE["sid"]]
    else:
        assert (ours.sid, ours.status, ours.date_created) == (theirs.sid, theirs.status, theirs.date_created)


def test_twilios_error_answers_raise_the_sdks_exception(recorder):
    recorder.status = 400
    with pytest.raises(TwilioException) as raised:
        CALLS["text"](build_client(SID, TOKEN, recorder.url, 5))
    outcome = sending.classify(raised.value, utcnow())
    assert isinstance(outcome, Failed) and (outcome.http_status, outcome.code, outcome.retry) == (400, 21211, False)


def test_connections_are_kept_alive_between_sends(recorder):
    client = build_client(SID, TOKEN, recorder.url, 5)
    for _ in range(3):
        CALLS["text"](client)
    pools = [manager.pools[key] for manager in client.http_client._managers.values() for key in manager.pools.keys()]
    assert len(pools) == 1 and pools[0].num_connections == 1 and pools[0].num_requests == 3


def test_a_proxy_from_the_environment_is_used_with_its_credentials(recorder, monkeypatch):
    """HTTP(S)_PROXY is honoured as `requests` honours it: the request goes to the proxy, in
    absolute form, with Proxy-Authorization from the proxy URL's credentials."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://us%40er:pa ss@127.0.0.1:{recorder.server_address[1]}")
    monkeypatch.setenv("http_proxy", f"http://us%40er:pa ss@127.0.0.1:{recorder.server_address[1]}")
    sent = CALLS["text"](build_client(SID, TOKEN, "http://api.twilio.invalid:8080", 5))
    assert sent.sid == MESSAGE["sid"]
    [through_proxy] = recorder.seen
    assert through_proxy["target"].startswith("http://api.twilio.invalid:8080/2010-04-01/Accounts/")
    import base64
    assert through_proxy["headers"]["proxy-authorization"] == "Basic " + base64.b64encode(b"us@er:pa ss").decode()
    # NO_PROXY names the host: straight to it, no proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    CALLS["text"](build_client(SID, TOKEN, recorder.url, 5))
    assert recorder.seen[1]["target"].startswith("/2010-04-01/Accounts/")
    assert "proxy-authorization" not in recorder.seen[1]["headers"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_urllib3s_errors_are_classified_as_requests_errors_were():
    """A refused connection never left (retry, no lookup); a connection dropped after the request
    was written, or a read timeout, may have been accepted (look it up first). Real sockets."""
    refused = build_client(SID, TOKEN, f"http://127.0.0.1:{closed_port()}", 2)
    with pytest.raises(urllib3.exceptions.NewConnectionError) as raised:
        CALLS["text"](refused)
    assert request_never_left(raised.value)
    assert isinstance(sending.send(refused, {"to": "whatsapp:+15551234567", "from_": "whatsapp:+14155238886",
                                             "body": "x"}, utcnow()), Failed)

    def serve(answer: bool) -> socket.socket:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def accept() -> None:
            conn, _ = server.accept()
            conn.recv(65536)
            if not answer:
                conn.close()  # dropped after the request was read
            else:
                threading.Event().wait(3)  # never answers: a read timeout
                conn.close()

        threading.Thread(target=accept, daemon=True).start()
        return server

    for answer, error in ((False, urllib3.exceptions.ProtocolError), (True, urllib3.exceptions.ReadTimeoutError)):
        with serve(answer) as server:
            client = build_client(SID, TOKEN, f"http://127.0.0.1:{server.getsockname()[1]}", 1)
            with pytest.raises(error) as raised:
                CALLS["text"](client)
        assert not request_never_left(raised.value)
        outcome = sending.classify(raised.value, utcnow())
        assert isinstance(outcome, Unknown) and not isinstance(outcome, Accepted)


def test_forms_are_encoded_as_requests_encodes_them():
    from requests.models import RequestEncodingMixin

    fields = {"Body": "a b&c=d ✓ +", "MediaUrl": ["https://e/1", "https://e/2 x"], "Skip": None, "N": 3,
              "B": b"raw bytes"}
    assert form_encode(fields) == RequestEncodingMixin._encode_params(fields)
    assert form_encode([("A", "1"), ("A", "2")]) == RequestEncodingMixin._encode_params([("A", "1"), ("A", "2")])
