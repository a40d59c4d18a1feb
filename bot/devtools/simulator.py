"""A local fake of Twilio's Messages REST API (2010-04-01), served over real HTTP.

Point the official ``twilio`` SDK at it and it behaves like api.twilio.com for
sending WhatsApp messages, so the bot can be exercised end to end without a
Twilio account or network access::

    sim = TwilioSimulator("AC" + "1" * 32, "token", webhook_url="http://127.0.0.1:5000/twilio/webhook").start()
    client = Client("AC" + "1" * 32, "token", http_client=TwilioHttpClient(timeout=5))
    client.api.base_url = sim.url      # every client.messages.* call now hits the simulator

Besides accepting sends it can script failures (:meth:`TwilioSimulator.fail_next`),
slow answers (:meth:`TwilioSimulator.hang_next`), add a fixed API latency to every
create (``latency=``, ``--latency-ms``: api.twilio.com answers in ~100-300 ms, which
is what bounds a sender's throughput), and play Twilio's side of the webhooks: signed
status callbacks and signed inbound WhatsApp messages. Arrival times of creates
(:attr:`TwilioSimulator.timings`) and webhook durations are recorded for benchmarks.

Run it standalone with ``python -m bot.devtools.simulator --help``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from email.utils import formatdate
from html import escape
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import requests
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from bot.devmode import SIMULATOR_EVENTS_PATH, dev_api_key, dev_events_secret, dev_private_key
from bot.devtools.sendgrid_simulator import SendGridSimulator

try:  # phonenumbers is a project dependency, but keep the simulator usable without it.
    import phonenumbers
except ImportError:  # pragma: no cover - exercised only where phonenumbers is missing
    phonenumbers = None

__all__ = ["TwilioSimulator", "SimulatorTimeout", "sign", "main", "parse_args"]

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
#: The emails the SendGrid side accepted, for people: JSON, or a page in a browser (bin/dev).
SIMULATOR_EMAILS_PATH = "/_emails"
DEFAULT_WHATSAPP_SENDER = "whatsapp:+14155238886"  # Twilio's WhatsApp sandbox number
MAX_BODY_CHARS = 1600
WEBHOOK_TIMEOUT = 5.0  # seconds; outgoing webhook posts must never block forever

_E164_RE = re.compile(r"^\+[1-9]\d{6,14}$")
# Fields the SDK may repeat; stored as lists in `form` even when sent once, so
# callers never have to care whether there was one MediaUrl or several.
_LIST_FIELDS = frozenset({"MediaUrl", "PersistentAction"})

# Messages as the real API words them (close enough for logs and assertions).
_ERROR_MESSAGES = {
    20003: "Authenticate",
    20004: "Method not allowed",
    20404: "The requested resource {path} was not found",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    21656: "The ContentVariables Parameter is invalid.",
    20500: "Internal Server Error",
}


class SimulatorTimeout(AssertionError, TimeoutError):
    """Raised by :meth:`TwilioSimulator.wait_for_messages` when too few sends arrived.

    Both an ``AssertionError`` (so pytest shows it as a failed expectation) and a
    ``TimeoutError``.
    """


#: Statuses a status callback may carry for an outbound message (what --statuses accepts).
CALLBACK_STATUSES = ("queued", "sending", "sent", "delivered", "undelivered", "failed", "read")


def _rfc2822_now() -> str:
    """The current time the way Twilio formats dates: ``Thu, 24 Aug 2023 05:01:45 +0000``."""
    return formatdate(usegmt=False).replace("-0000", "+0000")


def _new_sid(prefix: str = "SM") -> str:
    """A Twilio-shaped SID: two-letter prefix plus 32 lowercase hex characters."""
    return prefix + uuid.uuid4().hex


def _is_e164(number: str) -> bool:
    """True when ``number`` is a plausible +E.164 number.

    Uses ``is_possible_number`` rather than ``is_valid_number`` on purpose:
    tests use fictitious numbers such as +1 555 123 4567, which libphonenumber
    rightly calls invalid but Twilio's format check accepts.
    """
    if not _E164_RE.match(number):
        return False
    if phonenumbers is None:
        return True
    try:
        return phonenumbers.is_possible_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return False


def _num_segments(body: str, whatsapp: bool) -> int:
    """Segments Twilio would bill: WhatsApp is always 1; SMS splits at 160/153 (GSM) or 70/67 (UCS-2)."""
    if whatsapp or not body:
        return 1
    single, multi = (160, 153) if body.isascii() else (70, 67)
    return 1 if len(body) <= single else math.ceil(len(body) / multi)


def _form_to_dict(form: MultiDict) -> dict[str, Any]:
    """Flatten a MultiDict: one string per field, lists for repeatable/repeated fields."""
    out: dict[str, Any] = {}
    for key in form.keys():
        values = form.getlist(key)
        out[key] = values if key in _LIST_FIELDS or len(values) > 1 else values[0]
    return out


def _normalize_params(params: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
    """Turn a dict (values may be lists) or a list of pairs into (name, str value) pairs, dropping None."""
    items = params.items() if isinstance(params, Mapping) else params
    pairs: list[tuple[str, str]] = []
    for key, value in items:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                pairs.append((key, str(v)))
    return pairs


def sign(auth_token: str, url: str, params: Mapping[str, Any] | list[tuple[str, str]]) -> str:
    """Compute the ``X-Twilio-Signature`` Twilio would send for a POST of ``params`` to ``url``.

    ``params`` may be a dict (a list value means a repeated field) or a list of
    (name, value) pairs. Delegates to the SDK's ``RequestValidator`` so the bot's
    own validation is checked against the reference implementation.
    """
    # RequestValidator only understands repeated fields through a getlist()
    # method, so hand it a MultiDict rather than a dict of lists.
    return RequestValidator(auth_token).compute_signature(url, MultiDict(_normalize_params(params)))


def _post_signed(auth_token: str, url: str, params: Mapping[str, Any] | list[tuple[str, str]]) -> requests.Response:
    """POST form ``params`` to ``url`` with a valid Twilio signature, as Twilio's webhooks do."""
    pairs = _normalize_params(params)
    # Twilio signs the URL without its connection overrides (`#rc=3&rp=5xx`), which it reads
    # itself and never sends.
    headers = {
        "X-Twilio-Signature": sign(auth_token, url.split("#", 1)[0], pairs),
        "User-Agent": "TwilioProxy/1.1",
        "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
    }
    with requests.Session() as session:
        session.trust_env = False  # never route local webhooks through an environment proxy
        return session.post(url, data=pairs, headers=headers, timeout=WEBHOOK_TIMEOUT)


class _ApiError(Exception):
    """A Twilio-style error answer: HTTP status plus Twilio error code and message."""

    def __init__(self, status: int, code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message or _ERROR_MESSAGES.get(code, "simulated failure")

    def response(self) -> Response:
        # Legacy (non RFC-9457) shape: no "type"/"title" keys, so the SDK raises
        # TwilioRestException rather than TwilioServiceException.
        payload = {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }
        headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if self.status == 401 else None
        return _json_response(payload, self.status, headers)


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status=status, headers=headers, mimetype="application/json")


class _QuietHandler(WSGIRequestHandler):
    """Request handler that skips werkzeug's per-request access log (the simulator logs sends itself)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class TwilioSimulator:
    """A fake Twilio Messages API on 127.0.0.1, plus Twilio's side of the webhooks.

    State (``messages``, ``requests``, scripted failures) is guarded by one lock;
    the HTTP server runs in a daemon thread and answers requests concurrently.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_url: str | None = None,
        auto_callbacks: bool = False,
        callback_statuses: tuple[str, ...] = ("sent", "delivered", "read"),
        callback_delay: float = 0.2,
        failing_numbers: Mapping[str, int] | None = None,
        latency: float = 0.0,
        sendgrid_api_key: str | None = None,
        sendgrid_events_url: str | None = None,
    ) -> None:
        """Configure the simulator; nothing listens until :meth:`start`.

        ``webhook_url`` is where :meth:`send_inbound` posts (the bot's inbound
        webhook). With ``auto_callbacks`` every accepted send is followed by
        signed status callbacks for ``callback_statuses``, ``callback_delay``
        seconds apart, posted to that send's ``StatusCallback``. ``latency`` (seconds)
        is how long every Messages create takes to answer, as the real API's round trip
        does; other requests are served meanwhile (one thread per request).

        The same server plays SendGrid (`/v3/...`, :attr:`sendgrid`): it accepts
        ``sendgrid_api_key`` (default: derived from ``auth_token``, ``dev_api_key``), signs its
        events with a key derived from ``auth_token`` (``dev_private_key``: a server started
        apart computes the public half) and posts them to ``sendgrid_events_url``.
        """
        if latency < 0:
            raise ValueError("latency must be >= 0 seconds")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.host = host
        self.port = port
        self.webhook_url = webhook_url
        self.auto_callbacks = auto_callbacks
        self.callback_statuses = tuple(callback_statuses)
        self.callback_delay = callback_delay
        self.latency = latency
        #: Recipients (E.164) whose sends are accepted and then fail with this error code in the
        #: status callbacks (sent, then undelivered/failed), as an unreachable handset would.
        self.failing_numbers = {k.removeprefix("whatsapp:"): v for k, v in (failing_numbers or {}).items()}

        self._cond = threading.Condition(threading.RLock())
        self._stopping = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._messages: dict[str, dict[str, Any]] = {}  # sid -> resource + "form"; dicts keep send order
        self._requests: list[dict[str, Any]] = []
        self._webhooks: list[dict[str, Any]] = []
        self._timings: list[dict[str, Any]] = []
        self._failures: list[tuple[int, int, str]] = []
        self._fetch_failures: list[tuple[int, int, str]] = []
        self._hangs: list[float] = []
        self._lost_answers: list[str | int] = []
        self._events: list[dict[str, Any]] = []
        #: SendGrid's side, answered by this same server (bot/devtools/sendgrid_simulator.py).
        self.sendgrid = SendGridSimulator(sendgrid_api_key or dev_api_key(auth_token),
                                          private_key=dev_private_key(auth_token), events_url=sendgrid_events_url)

        base = f"/{API_VERSION}/Accounts/<account_sid>"
        self._routes = Map(
            [
                Rule(f"/{API_VERSION}/Accounts/<account_sid>.json", endpoint="account", methods=["GET"]),
                Rule(f"{base}/Messages.json", endpoint="messages", methods=["GET", "POST"]),
                Rule(f"{base}/Messages/<sid>.json", endpoint="message", methods=["GET"]),
                # Development mode's receiver of the bot's events (not Twilio's: the backend's).
                Rule(SIMULATOR_EVENTS_PATH, endpoint="events", methods=["GET", "POST"]),
                # What a newcomer looks at to see an email arrive (`flask chat`'s /emails reads it too).
                Rule(SIMULATOR_EMAILS_PATH, endpoint="emails", methods=["GET"]),
            ]
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "TwilioSimulator":
        """Start serving in a background thread (port 0 picks a free port); returns ``self``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self.sendgrid.open()
        self._server = make_server(self.host, self.port, self._wsgi_app, threaded=True, request_handler=_QuietHandler)
        self.port = self._server.server_port
        # A short poll interval keeps stop() (which waits for the serve loop) fast in test teardowns.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="twilio-simulator", daemon=True
        )
        self._thread.start()
        log.debug("Twilio simulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving; wakes any scripted hang and cancels pending automatic callbacks."""
        self._stopping.set()
        self.sendgrid.close()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "TwilioSimulator":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL to assign to ``client.api.base_url``, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("TwilioSimulator is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ inspection & scripting

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Deep copies of every accepted send, oldest first: the resource JSON plus ``"form"`` (raw fields)."""
        with self._cond:
            return copy.deepcopy(list(self._messages.values()))

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request to a Messages endpoint (creates and fetches, accepted or not), oldest first.

        Each is ``{"method", "path", "args", "form", "headers"}``; ``Authorization`` is never stored.
        """
        with self._cond:
            return copy.deepcopy(self._requests)

    @property
    def webhooks(self) -> list[dict[str, Any]]:
        """Every webhook the simulator posted: ``{"kind", "url", "form", "status_code", "error",
        "posted_at", "duration"}`` (``posted_at`` is ``time.time()`` when the POST began, ``duration``
        the seconds until its answer or error)."""
        with self._cond:
            return copy.deepcopy(self._webhooks)

    @property
    def timings(self) -> list[dict[str, Any]]:
        """One entry per accepted create, in arrival order: ``{"sid", "to", "body", "received_at",
        "answered_at"}``, both times ``time.time()`` (the moment the request arrived, i.e. was handed
        to "Twilio", and the moment its answer was about to be written, after any latency or hang).
        """
        with self._cond:
            return [dict(t) for t in self._timings]

    def fail_next(self, status: int, code: int, message: str = "simulated failure", times: int = 1) -> None:
        """Make the next ``times`` creates answer with a Twilio error (e.g. 429/20429, 500/20500, 400/21211).

        They are still recorded in :attr:`requests` but not in :attr:`messages`.
        """
        with self._cond:
            self._failures.extend([(status, code, message)] * times)

    def hang_next(self, seconds: float, times: int = 1) -> None:
        """Make the next ``times`` creates sleep ``seconds`` before answering — to trip client timeouts.

        The message is accepted before the sleep, as a slow Twilio would have sent it although its
        answer never reached the client. Combined with fail_next, the sleep precedes the error.
        """
        with self._cond:
            self._hangs.extend([seconds] * times)

    def lose_answer_next(self, how: str | int = "drop", times: int = 1) -> None:
        """Accept the next ``times`` creates, then lose the answer on the way back: ``"drop"``
        closes the connection without a response (a proxy or a network failing after the request
        arrived), 502 or 504 answer as a proxy in front of Twilio would, 500 as Twilio's own
        error 20500 does, ``"garbled"`` is a 201 whose body is not JSON. The message *is* sent:
        a client that simply retries sends it twice.
        """
        with self._cond:
            self._lost_answers.extend([how] * times)

    def set_status(self, sid: str, status: str, *, error_code: int | None = None) -> None:
        """Move message ``sid`` to ``status`` without posting a callback, as if Twilio's callback
        were lost: only a fetch (``GET .../Messages/<sid>.json``) tells. KeyError for an unknown sid."""
        with self._cond:
            self._set_status(self._messages[sid], status, error_code)

    def fail_next_fetch(self, status: int, code: int, message: str = "simulated failure", times: int = 1) -> None:
        """Make the next ``times`` fetches of one message (``GET .../Messages/<sid>.json``) answer
        with a Twilio error (e.g. 500/20500, 429/20429), as :meth:`fail_next` does for creates."""
        with self._cond:
            self._fetch_failures.extend([(status, code, message)] * times)

    def reset(self) -> None:
        """Forget messages, requests, webhooks and any scripted failures or hangs (SendGrid's side too)."""
        with self._cond:
            self._messages.clear()
            self._requests.clear()
            self._webhooks.clear()
            self._timings.clear()
            self._failures.clear()
            self._fetch_failures.clear()
            self._hangs.clear()
            self._lost_answers.clear()
        self.sendgrid.reset()

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least ``count`` sends were accepted and return them (as :attr:`messages`).

        Raises :class:`SimulatorTimeout` (an ``AssertionError`` and ``TimeoutError``)
        listing what did arrive if ``timeout`` seconds pass first.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout=timeout):
                seen = [(m["to"], m["body"]) for m in self._messages.values()]
                raise SimulatorTimeout(
                    f"expected at least {count} accepted message(s) within {timeout}s, got {len(seen)}: {seen}"
                )
            return self.messages

    # ------------------------------------------------------------------ webhooks (Twilio -> bot)

    def send_status_callback(
        self,
        sid: str,
        status: str,
        *,
        error_code: int | None = None,
        url: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> requests.Response:
        """POST a signed status callback for message ``sid`` and record the new status.

        Goes to ``url`` or else the message's ``StatusCallback``. An unknown ``sid``
        is allowed only with an explicit ``url`` (to test how the bot treats strays).
        """
        with self._cond:
            record = self._messages.get(sid)
            if record is not None:
                self._set_status(record, status, error_code)
                target = url or record["form"].get("StatusCallback")
                from_, to = record["from"], record["to"]
            else:
                target, from_, to = url, None, None
        if not target:
            raise ValueError(f"no URL to post the status callback for {sid} to (unknown sid or no StatusCallback)")

        params: dict[str, Any] = {
            "MessageSid": sid,
            "SmsSid": sid,
            "MessageStatus": status,
            "SmsStatus": status,
            "AccountSid": self.account_sid,
            "From": from_,
            "To": to,
            "ApiVersion": API_VERSION,
        }
        if to and to.startswith("whatsapp:"):
            params["ChannelPrefix"] = "whatsapp"
        if error_code is not None:
            params["ErrorCode"] = error_code
        params.update(extra or {})
        return self._post_webhook("status", target, params)

    def send_inbound(
        self,
        from_: str,
        body: str = "",
        *,
        to: str | None = None,
        profile_name: str | None = None,
        extra: dict[str, Any] | None = None,
        url: str | None = None,
    ) -> requests.Response:
        """POST a signed inbound WhatsApp message from ``from_`` to ``url`` or ``webhook_url``; return the response.

        ``from_`` gets a ``whatsapp:`` prefix if it lacks one. ``to`` defaults to the
        WhatsApp sender of the latest accepted send, else Twilio's sandbox number.
        ``extra`` fields are added last and may override the defaults.
        """
        target = url or self.webhook_url
        if not target:
            raise ValueError("send_inbound needs url= or a webhook_url on the simulator")
        if not from_.startswith("whatsapp:"):
            from_ = "whatsapp:" + from_
        if to is None:
            with self._cond:
                senders = [m["from"] for m in self._messages.values() if (m["from"] or "").startswith("whatsapp:")]
            to = senders[-1] if senders else DEFAULT_WHATSAPP_SENDER
        sid = _new_sid()
        params: dict[str, Any] = {
            "MessageSid": sid,
            "SmsSid": sid,
            "SmsMessageSid": sid,
            "AccountSid": self.account_sid,
            "From": from_,
            "To": to,
            "Body": body,
            "NumMedia": "0",
            "NumSegments": "1",
            "SmsStatus": "received",
            "ApiVersion": API_VERSION,
            "WaId": from_.removeprefix("whatsapp:").lstrip("+"),
            "MessageType": "text",
        }
        if profile_name is not None:
            params["ProfileName"] = profile_name
        params.update(extra or {})
        return self._post_webhook("inbound", target, params)

    def _post_webhook(self, kind: str, url: str, params: dict[str, Any]) -> requests.Response:
        """Sign and POST, recording the attempt in :attr:`webhooks` whatever happens."""
        entry: dict[str, Any] = {"kind": kind, "url": url, "form": dict(params), "status_code": None, "error": None,
                                 "posted_at": time.time(), "duration": None}
        started = time.perf_counter()
        try:
            response = _post_signed(self.auth_token, url, params)
            entry["status_code"] = response.status_code
            return response
        except requests.RequestException as exc:
            entry["error"] = repr(exc)
            raise
        finally:
            entry["duration"] = time.perf_counter() - started
            with self._cond:
                self._webhooks.append(entry)

    def _callback_plan(self, sid: str) -> list[tuple[str, int | None]]:
        """The statuses (and error codes) the callbacks of one send walk through."""
        with self._cond:
            record = self._messages.get(sid)
            to = (record or {}).get("to", "").removeprefix("whatsapp:")
        code = self.failing_numbers.get(to)
        if code is None:
            return [(status, None) for status in self.callback_statuses]
        return [("sent", None), ("undelivered" if code == 30003 else "failed", code)]

    def _auto_callbacks(self, sid: str) -> None:
        """Background thread body: walk one send through its callback statuses."""
        for status, error_code in self._callback_plan(sid):
            # Wait first, so the bot has stored the SID from the 201 before hearing about it.
            if self._stopping.wait(self.callback_delay):
                return
            with self._cond:
                record = self._messages.get(sid)
                if record is None:  # reset() happened meanwhile
                    return
                has_callback = bool(record["form"].get("StatusCallback"))
                if not has_callback:
                    self._set_status(record, status, error_code)
            if not has_callback:
                continue
            try:
                self.send_status_callback(sid, status, error_code=error_code)
            except Exception as exc:  # a dead webhook must never break the simulator
                log.warning("status callback %s for %s failed: %s", status, sid, exc)

    def _set_status(self, record: dict[str, Any], status: str, error_code: int | None) -> None:
        """Update a stored message's status (caller holds the lock)."""
        now = _rfc2822_now()
        record["status"] = status
        record["date_updated"] = now
        if status in ("sent", "delivered", "read") and record["date_sent"] is None:
            record["date_sent"] = now
        if error_code is not None:
            record["error_code"] = error_code
            record["error_message"] = f"simulated error {error_code}"

    # ------------------------------------------------------------------ the REST API (SDK -> Twilio)

    def _wsgi_app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        if request.path.startswith("/v3/"):  # SendGrid's API, on the same port
            return self.sendgrid.handle(request)(environ, start_response)
        try:
            endpoint, values = self._routes.bind_to_environ(environ).match()
            self._record_request(request)
            response = getattr(self, f"_handle_{endpoint}")(request, **values)
        except _ApiError as exc:
            response = exc.response()
        except MethodNotAllowed:
            response = _ApiError(405, 20004).response()
        except NotFound:
            response = _ApiError(404, 20404, _ERROR_MESSAGES[20404].format(path=request.path)).response()
        except HTTPException as exc:  # anything else werkzeug raises, still as Twilio-style JSON
            response = _ApiError(exc.code or 500, exc.code or 500, exc.description).response()
        return response(environ, start_response)

    def _record_request(self, request: Request) -> None:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        entry = {
            "method": request.method,
            "path": request.path,
            "args": _form_to_dict(request.args),
            "form": _form_to_dict(request.form),
            "headers": headers,
        }
        with self._cond:
            self._requests.append(entry)

    def _check_auth(self, request: Request, account_sid: str) -> None:
        auth = request.authorization
        ok = (
            auth is not None
            and auth.type == "basic"
            and auth.username == self.account_sid
            and auth.password == self.auth_token
            and account_sid == self.account_sid
        )
        if not ok:
            raise _ApiError(401, 20003)

    def _handle_account(self, request: Request, account_sid: str) -> Response:
        """GET Accounts/<sid>.json: what `flask doctor` uses to check credentials."""
        self._check_auth(request, account_sid)
        return _json_response({"sid": account_sid, "friendly_name": "Twilio simulator", "status": "active",
                               "type": "Full", "uri": f"/{API_VERSION}/Accounts/{account_sid}.json"})

    def _handle_messages(self, request: Request, account_sid: str) -> Response:
        if request.method == "GET":
            self._check_auth(request, account_sid)
            return self._list_messages(request, account_sid)

        received_at = time.time()
        with self._cond:
            hang = self._hangs.pop(0) if self._hangs else None
            failure = self._failures.pop(0) if self._failures else None
            lost = self._lost_answers.pop(0) if self._lost_answers and failure is None else None
        self._check_auth(request, account_sid)
        if failure is not None:
            if hang is not None:
                self._stopping.wait(hang)
            raise _ApiError(*failure)

        form = request.form
        self._validate(form)
        record = self._store(account_sid, form)
        if self.latency:
            # The API's round trip: accepted on arrival, answered later. An Event wait (not
            # time.sleep) so stop() is never held up; each request has its own thread, so
            # concurrent creates overlap their waits as they would against api.twilio.com.
            self._stopping.wait(self.latency)
        if hang is not None:
            # Like a slow Twilio: the message is already accepted, only the answer is late.
            # An Event wait, so stop() never waits out a long hang.
            self._stopping.wait(hang)
        with self._cond:
            self._timings.append({"sid": record["sid"], "to": record["to"], "body": record["body"],
                                  "received_at": received_at, "answered_at": time.time()})
        log.info("send %s %s -> %s: %r", record["sid"], record["from"] or record["messaging_service_sid"],
                 record["to"], record["body"] if record["body"] else form.get("ContentSid"))
        if self.auto_callbacks:
            threading.Thread(target=self._auto_callbacks, args=(record["sid"],), daemon=True).start()
        if lost == "drop":
            # Close the connection under the server: the client reads no status line at all.
            sock = request.environ.get("werkzeug.socket")
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        elif lost == 500:
            # Twilio's own "Internal Server Error" after the message was stored.
            return _ApiError(500, 20500).response()
        elif lost == "garbled":
            return Response("<html><body>accepted</body></html>", status=201, mimetype="text/html")
        elif lost is not None:
            # A proxy's page, not Twilio's JSON: nothing in it says whether the message was taken.
            return Response(f"<html><body><h1>{lost} proxy error</h1></body></html>", status=int(lost),
                            mimetype="text/html")
        return _json_response(self._resource(record), 201)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events the bot pushed here (development mode), each verified as a receiver would."""
        with self._cond:
            return copy.deepcopy(self._events)

    def _handle_events(self, request: Request) -> Response:
        """Receive the bot's events as a backend would: verify the Standard Webhooks signature with
        the `standardwebhooks` library (secret derived from the auth token: bot.devmode), keep them."""
        if request.method == "GET":
            return _json_response({"events": self.events})
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        try:
            payload = Webhook(dev_events_secret(self.auth_token)).verify(request.get_data(), dict(request.headers))
        except (WebhookVerificationError, ValueError):
            log.warning("event with a bad signature refused")
            return _json_response({"error": "bad signature"}, 400)
        with self._cond:
            self._events.append({"id": request.headers.get("webhook-id"), **payload})
        log.info("event %s %s", payload.get("type"), request.headers.get("webhook-id"))
        return Response(status=204)

    def received_emails(self) -> list[dict[str, Any]]:
        """The emails the SendGrid side accepted, oldest first, as `GET /_emails` lists them: id
        (X-Message-Id), our `message_id` (custom_args), to, from, subject, text, html,
        received_at (ISO 8601, UTC) and `events`: the event names posted back and answered 2xx."""
        delivered: dict[str, list[str]] = {}
        for post in self.sendgrid.event_posts:
            if post["status_code"] is not None and 200 <= post["status_code"] < 300:
                for event in post["events"]:
                    x_message_id = str(event.get("sg_message_id", "")).split(".", 1)[0]
                    delivered.setdefault(x_message_id, []).append(str(event.get("event")))
        return [{
            "id": email["x_message_id"],
            "message_id": email["custom_args"].get("message_id"),
            "to": email["to"],
            "from": email["from"],
            "from_name": email["from_name"],
            "subject": email["subject"],
            "text": email["text"],
            "html": email["html"],
            "received_at": datetime.fromtimestamp(email["received_at"], timezone.utc).isoformat(timespec="seconds"),
            "events": delivered.get(email["x_message_id"], []),
        } for email in self.sendgrid.emails]

    def _handle_emails(self, request: Request) -> Response:
        """`GET /_emails`: the accepted emails as JSON, or as a page for a browser."""
        emails = self.received_emails()
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return Response(_emails_page(emails), mimetype="text/html")
        return _json_response({"emails": emails})

    def _handle_message(self, request: Request, account_sid: str, sid: str) -> Response:
        self._check_auth(request, account_sid)
        with self._cond:
            if self._fetch_failures:
                raise _ApiError(*self._fetch_failures.pop(0))
            record = self._messages.get(sid)
            if record is None:
                raise _ApiError(404, 20404, _ERROR_MESSAGES[20404].format(path=request.path))
            return _json_response(self._resource(record))

    def _list_messages(self, request: Request, account_sid: str) -> Response:
        """Minimal single-page Messages list (newest first), filtered by To/From like Twilio."""
        with self._cond:
            records = [self._resource(r) for r in reversed(self._messages.values())]
        for field, key in (("To", "to"), ("From", "from")):
            if request.args.get(field):
                records = [r for r in records if r[key] == request.args[field]]
        uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"
        return _json_response(
            {
                "messages": records,
                "uri": uri,
                "first_page_uri": uri,
                "next_page_uri": None,
                "previous_page_uri": None,
                "page": 0,
                "page_size": max(len(records), 50),
                "start": 0,
                "end": max(len(records) - 1, 0),
            }
        )

    def _validate(self, form: MultiDict) -> None:
        """Reject a create the way Twilio would; unknown fields are ignored, never rejected."""
        to, from_ = form.get("To", ""), form.get("From", "")
        if not to:
            raise _ApiError(400, 21604)
        if not from_ and not form.get("MessagingServiceSid"):
            raise _ApiError(400, 21603)
        # A WhatsApp sender can only reach whatsapp:+E164 addresses; SMS needs plain +E164.
        # With no From (Messaging Service) the To prefix alone tells the channel.
        if from_.startswith("whatsapp:") or (not from_ and to.startswith("whatsapp:")):
            valid = to.startswith("whatsapp:") and _is_e164(to.removeprefix("whatsapp:"))
        else:
            valid = _is_e164(to)
        if not valid:
            raise _ApiError(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        body = form.get("Body", "")
        if not body and not form.get("ContentSid") and not form.getlist("MediaUrl"):
            raise _ApiError(400, 21602)
        if len(body) > MAX_BODY_CHARS:
            raise _ApiError(400, 21617)
        if "ContentVariables" in form:
            try:
                variables = json.loads(form["ContentVariables"])
            except ValueError:
                variables = None
            if not isinstance(variables, dict):
                raise _ApiError(400, 21656)

    def _store(self, account_sid: str, form: MultiDict) -> dict[str, Any]:
        """Create and remember the message resource for an accepted send."""
        sid = _new_sid()
        now = _rfc2822_now()
        to, from_ = form["To"], form.get("From") or None
        service = form.get("MessagingServiceSid") or None
        body = form.get("Body", "")
        uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}"
        record: dict[str, Any] = {
            "account_sid": account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_,
            "messaging_service_sid": service,
            "num_media": str(len(form.getlist("MediaUrl"))),
            "num_segments": str(_num_segments(body, to.startswith("whatsapp:"))),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            # Via a Messaging Service with no From, Twilio answers "accepted" until it picks a sender.
            "status": "accepted" if service and not from_ else "queued",
            "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
            "to": to,
            "uri": f"{uri}.json",
            "form": _form_to_dict(form),
        }
        with self._cond:
            self._messages[sid] = record
            self._cond.notify_all()
        return record

    @staticmethod
    def _resource(record: dict[str, Any]) -> dict[str, Any]:
        """The JSON Twilio would return for a stored record (without our ``form`` bookkeeping)."""
        return {k: v for k, v in record.items() if k != "form"}


_EMAILS_PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>Emails (SendGrid simulator)</title>
<body style="font-family: sans-serif; max-width: 50rem; margin: 2rem auto; padding: 0 1rem">
<h1>Emails the bot sent</h1><p>The local SendGrid simulator received these (newest first; the page
refreshes itself). Nothing left this machine.</p>{items}</body></html>"""


def _emails_page(emails: list[dict[str, Any]]) -> str:
    """The `/_emails` page: each email's subject, addresses, events, text, and its HTML in a
    sandboxed frame (the copy is the bot's, but a page of ours never runs an email's markup)."""
    if not emails:
        return _EMAILS_PAGE.format(items="<p><em>No email yet.</em></p>")
    items = []
    for email in reversed(emails):
        events = ", ".join(email["events"]) or "none yet"
        html = (f'<iframe sandbox="" style="width: 100%; height: 14rem; border: 1px solid #ccc" '
                f'srcdoc="{escape(email["html"])}"></iframe>' if email["html"] else "")
        items.append(
            f'<article style="border-top: 1px solid #ccc; padding: .5rem 0">'
            f'<h2 style="margin-bottom: .2rem">{escape(email["subject"] or "(no subject)")}</h2>'
            f'<div>to {escape(email["to"])} · from {escape(email["from_name"] or "")} '
            f'&lt;{escape(email["from"])}&gt; · {escape(email["received_at"])} · events: {escape(events)}</div>'
            f'<pre style="white-space: pre-wrap">{escape(email["text"] or "")}</pre>{html}</article>')
    return _EMAILS_PAGE.format(items="".join(items))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (exits with status 2 on a bad option, as argparse does).

    Besides the options, the namespace carries ``failing_numbers`` (E.164 -> error code, from
    ``--fail``), ``bouncing`` (address -> bounce reason, from ``--bounce``) and
    ``callback_statuses`` (a tuple, from ``--statuses``). Reads no secrets.
    """
    from bot.devmode import SENDGRID_EVENTS_PATH, dev_webhook_url, simulator_port
    from bot.phone import InvalidNumber, normalize_e164

    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m bot.devtools.simulator",
                                     description="Local fake of Twilio's Messages API and SendGrid's mail/send.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=simulator_port())
    parser.add_argument("--account-sid", default=env.get("TWILIO_ACCOUNT_SID"),
                        help="default: TWILIO_ACCOUNT_SID, else the server's development secrets")
    parser.add_argument("--auth-token", default=env.get("TWILIO_AUTH_TOKEN"),
                        help="default: TWILIO_AUTH_TOKEN, else the server's development secrets")
    parser.add_argument("--webhook-url", default=env.get("TWILIO_WEBHOOK_URL") or dev_webhook_url(),
                        help="the bot's /twilio/webhook (status callbacks go to each send's StatusCallback)")
    parser.add_argument("--sendgrid-events-url", default=None,
                        help="where signed SendGrid events go (default: the bot's /sendgrid/events, on "
                             "--webhook-url's host)")
    parser.add_argument("--no-email-events", dest="email_events", action="store_false",
                        help="post no SendGrid events (processed, delivered, bounce...)")
    parser.add_argument("--bounce", action="append", default=[], metavar="ADDRESS[=REASON]",
                        help="emails to ADDRESS are accepted, then bounce (a REASON starting 'dropped:' "
                             "gives a dropped event instead)")
    parser.add_argument("--no-auto-callbacks", dest="auto_callbacks", action="store_false",
                        help="do not post sent/delivered/read status callbacks")
    parser.add_argument("--callback-delay", type=float, default=float(env.get("SIMULATOR_CALLBACK_DELAY", "0.5")),
                        help="seconds between status callbacks (default 0.5)")
    parser.add_argument("--latency-ms", type=float, default=float(env.get("SIMULATOR_LATENCY_MS", "0")),
                        help="milliseconds every Messages create takes to answer, like the real API's "
                             "round trip (default 0; the throughput benchmark uses 150)")
    parser.add_argument("--statuses", default="sent,delivered,read",
                        help="the callbacks each send gets, in order (default sent,delivered,read)")
    parser.add_argument("--fail", action="append", default=[], metavar="NUMBER=CODE",
                        help="sends to NUMBER are accepted, then fail with CODE (e.g. +15550000001=30003)")
    args = parser.parse_args(argv)
    failing = {}
    for rule in args.fail:
        number, _, code = rule.partition("=")
        if not code.isdigit():
            parser.error(f"--fail wants NUMBER=CODE, got {rule!r}")
        number = number.strip()
        try:
            number = normalize_e164(number if number.startswith(("+", "00", "whatsapp:")) else "+" + number)
        except InvalidNumber as exc:
            parser.error(f"--fail {rule!r}: not a usable phone number ({exc})")
        failing[number] = int(code)
    statuses = tuple(s.strip().lower() for s in args.statuses.split(",") if s.strip())
    unknown = [s for s in statuses if s not in CALLBACK_STATUSES]
    if unknown:
        parser.error(f"--statuses: unknown status {', '.join(unknown)}; choose from {', '.join(CALLBACK_STATUSES)}")
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    bouncing = {}
    for rule in args.bounce:
        address, _, reason = rule.partition("=")
        address = address.strip().lower()
        if "@" not in address or any(c.isspace() for c in address):
            parser.error(f"--bounce wants ADDRESS[=REASON], got {rule!r}")
        bouncing[address] = reason.strip() or "550 5.1.1 The email account that you tried to reach does not exist"
    if args.sendgrid_events_url is None:
        origin = urlsplit(args.webhook_url)
        args.sendgrid_events_url = f"{origin.scheme}://{origin.netloc}{SENDGRID_EVENTS_PATH}"
    elif not args.sendgrid_events_url.startswith(("http://", "https://")):
        parser.error("--sendgrid-events-url must be an http(s) URL")
    args.bouncing = bouncing
    args.failing_numbers = failing
    args.callback_statuses = statuses
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the simulator in the foreground until Ctrl-C or SIGTERM, logging one line per send.

    Defaults come from TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_WEBHOOK_URL (else DEV_WEB_URL,
    which bin/dev sets) and SIMULATOR_PORT; with no Twilio credentials in the environment it uses
    the server's development secrets (instance/dev-secrets.json), so `bin/dev` needs no
    configuration at all. SendGrid's side accepts the development key and signs its events with
    the development key pair, both derived from the auth token (bot.devmode), and posts them to
    the web's /sendgrid/events.
    """
    from bot.devmode import default_instance_path, dev_secrets

    args = parse_args(argv)
    # The server's development secrets, unless given: read only now, so --help writes nothing.
    if not (args.account_sid and args.auth_token):
        secrets = dev_secrets(default_instance_path())
        args.account_sid = args.account_sid or secrets["TWILIO_ACCOUNT_SID"]
        args.auth_token = args.auth_token or secrets["TWILIO_AUTH_TOKEN"]

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sim = TwilioSimulator(
        args.account_sid,
        args.auth_token,
        host=args.host,
        port=args.port,
        webhook_url=args.webhook_url,
        auto_callbacks=args.auto_callbacks,
        callback_delay=args.callback_delay,
        callback_statuses=args.callback_statuses,
        failing_numbers=args.failing_numbers,
        latency=args.latency_ms / 1000,
        sendgrid_events_url=args.sendgrid_events_url if args.email_events else None,
    )
    sim.sendgrid.bouncing = args.bouncing
    sim.sendgrid.event_delay = args.callback_delay
    sim.start()
    log.info("Twilio simulator on %s (account %s); point client.api.base_url here", sim.url, args.account_sid)
    log.info("SendGrid simulator on the same port; emails it received: %s%s", sim.url, SIMULATOR_EMAILS_PATH)
    # Stop cleanly on Ctrl-C and on SIGTERM (what honcho/foreman send to Procfile processes).
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        log.info("Twilio simulator stopped")


if __name__ == "__main__":
    main()
