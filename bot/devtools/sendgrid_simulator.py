"""SendGrid's side for development and tests: `POST /v3/mail/send` and a signed Event Webhook.

It is served by the same process and port as the Twilio simulator (bot/devtools/simulator.py
routes every `/v3/...` request here; `TwilioSimulator.sendgrid` is this object), so the official
`sendgrid` SDK pointed at the simulator's URL (`SendGridAPIClient(key, host=sim.url)`, as
SENDGRID_API_URL does) talks to it over real HTTP::

    sim = TwilioSimulator(account_sid, auth_token).start()
    sg = sim.sendgrid                       # api_key, public_key (base64 DER), emails, knobs
    client = build_client(sg.api_key, sim.url, timeout=5)

What it does, as SendGrid does (docs/ARCHITECTURE.md, "Email channel (pieces)"):
- checks `Authorization: Bearer <key>` (401 with SendGrid's `{"errors": [...]}` otherwise);
- validates the body's shape (400 naming the `field`; 413 past 30 MB); with `verified_senders`,
  an unknown from address is a 403, as an unverified Sender Identity is;
- answers 202 with an empty body and `X-Message-Id`; sandbox mode answers 200 and sends nothing;
- records each accepted email (`emails`): to, subject, text, html, headers, custom_args;
- with an `events_url`, posts signed event batches there (ECDSA P-256 over timestamp + raw
  body, its own key pair): `processed` then `delivered` after each send (or `bounce` /
  `dropped` for the addresses in `bouncing`), and any batch through `post_events`.

Knobs like the Twilio part's: `fail_next(status, message)` (e.g. 401 "Maximum credits
exceeded"), `hang_next(seconds)`, `lose_answer_next("drop" | 502 | 504)`, `latency`.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import secrets
import socket
import threading
import time
from email.utils import parseaddr
from typing import Any, Iterable, Mapping

import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from werkzeug.wrappers import Request, Response

from bot.devmode import dev_api_key, dev_private_key, public_key_text

__all__ = ["SendGridSimulator", "sign", "dev_api_key", "dev_private_key", "public_key_text",
           "SIGNATURE_HEADER", "TIMESTAMP_HEADER"]

log = logging.getLogger(__name__)

MAIL_SEND_PATH = "/v3/mail/send"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
MAX_BODY_BYTES = 30 * 1024 * 1024
MAX_RECIPIENTS = 1000
MAX_CUSTOM_ARGS_BYTES = 10_000
WEBHOOK_TIMEOUT = 5.0  # seconds; an event POST must never block the simulator forever

# SendGrid's words (close enough for logs and assertions).
BAD_KEY = "The provided authorization grant is invalid, expired, or revoked"
NO_CREDITS = "Maximum credits exceeded"
UNVERIFIED_SENDER = ("The from address does not match a verified Sender Identity. Mail cannot be sent until this "
                     "error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ "
                     "to see the Sender Identity requirements")


class _SendGridError(Exception):
    """A SendGrid-style error answer: `{"errors": [{"message", "field", "help"}]}`."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def response(self) -> Response:
        payload = {"errors": [{"message": self.message, "field": self.field, "help": None}]}
        return Response(json.dumps(payload), status=self.status, mimetype="application/json")


def sign(private_key: ec.EllipticCurvePrivateKey, timestamp: str | int, body: bytes) -> str:
    """`X-Twilio-Email-Event-Webhook-Signature` for `body` sent at `timestamp`: base64 of the DER
    ECDSA (P-256, SHA-256) signature over the timestamp string followed by the raw body bytes."""
    signature = private_key.sign(str(timestamp).encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def _valid_address(value: Any) -> bool:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    _, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    return bool(at and local and "." in domain and address == value)


class SendGridSimulator:
    """SendGrid's mail/send and Event Webhook, plugged into the Twilio simulator's server.

    State is guarded by one lock; requests are answered concurrently (one thread each).
    """

    def __init__(self, api_key: str, *, private_key: ec.EllipticCurvePrivateKey | None = None,
                 events_url: str | None = None, auto_events: bool = True, event_delay: float = 0.2,
                 latency: float = 0.0, bouncing: Mapping[str, str] | None = None,
                 verified_senders: Iterable[str] | None = None) -> None:
        """`api_key`: the only key accepted. `private_key`: signs the events (default: a new
        random P-256 key; `public_key` is its public half). With an `events_url` and
        `auto_events`, each accepted email is followed by signed `processed` and `delivered`
        events, `event_delay` seconds apart. `bouncing`: address → bounce reason; those emails
        get `processed` then `bounce` instead (a reason starting "dropped:" gives `dropped`).
        `verified_senders`: from addresses allowed (None: any), else 403. `latency`: seconds
        every mail/send takes to answer."""
        if latency < 0:
            raise ValueError("latency must be >= 0 seconds")
        self.api_key = api_key
        self.private_key = private_key or ec.generate_private_key(ec.SECP256R1())
        self.events_url = events_url
        self.auto_events = auto_events
        self.event_delay = event_delay
        self.latency = latency
        self.bouncing = {k.lower(): v for k, v in (bouncing or {}).items()}
        self.verified_senders = None if verified_senders is None else {s.lower() for s in verified_senders}
        self._cond = threading.Condition(threading.RLock())
        self._stopping = threading.Event()
        self._emails: list[dict[str, Any]] = []
        self._attempts: list[dict[str, Any]] = []
        self._posts: list[dict[str, Any]] = []
        self._failures: list[tuple[int, str, str | None]] = []
        self._hangs: list[float] = []
        self._lost_answers: list[str | int] = []
        self._generation = 0  # bumped by reset(): automatic events of an older send are dropped

    # ------------------------------------------------------------------ lifecycle (driven by TwilioSimulator)

    def open(self) -> None:
        """The server started: allow waits again."""
        self._stopping.clear()

    def close(self) -> None:
        """The server is stopping: wake any hang or latency wait, cancel pending automatic events."""
        self._stopping.set()

    # ------------------------------------------------------------------ inspection & scripting

    @property
    def public_key(self) -> str:
        """The key to configure as SENDGRID_WEBHOOK_PUBLIC_KEY (base64 DER, as SendGrid shows it)."""
        return public_key_text(self.private_key)

    @property
    def emails(self) -> list[dict[str, Any]]:
        """Deep copies of every accepted email, oldest first: `{"x_message_id", "to", "to_name",
        "from", "from_name", "subject", "text", "html", "headers", "custom_args", "body",
        "received_at"}` (`to` is the first recipient's address; `body` the whole JSON)."""
        with self._cond:
            return copy.deepcopy(self._emails)

    @property
    def attempts(self) -> list[dict[str, Any]]:
        """Every mail/send request, accepted or not: `{"status", "body", "headers", "at"}`
        (`Authorization` never stored; `body` the parsed JSON, or None)."""
        with self._cond:
            return copy.deepcopy(self._attempts)

    @property
    def event_posts(self) -> list[dict[str, Any]]:
        """Every event batch posted: `{"url", "events", "status_code", "error", "posted_at"}`."""
        with self._cond:
            return copy.deepcopy(self._posts)

    def fail_next(self, status: int, message: str = "simulated failure", times: int = 1,
                  field: str | None = None) -> None:
        """Make the next `times` sends answer `status` with SendGrid's error JSON (e.g.
        401 "Maximum credits exceeded", 429, 500). Nothing is accepted."""
        with self._cond:
            self._failures.extend([(status, message, field)] * times)

    def hang_next(self, seconds: float, times: int = 1) -> None:
        """Accept the next `times` sends, then wait `seconds` before answering (to trip a timeout)."""
        with self._cond:
            self._hangs.extend([seconds] * times)

    def lose_answer_next(self, how: str | int = "drop", times: int = 1) -> None:
        """Accept the next `times` sends, then lose the answer: "drop" closes the connection, 502
        or 504 answer as a proxy in front of SendGrid would. The email *is* sent."""
        with self._cond:
            self._lost_answers.extend([how] * times)

    def reset(self) -> None:
        """Forget emails, attempts, event posts and scripted failures; automatic events still
        pending for earlier sends are never posted."""
        with self._cond:
            self._generation += 1
            for state in (self._emails, self._attempts, self._posts, self._failures, self._hangs,
                          self._lost_answers):
                state.clear()

    def wait_for_emails(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least `count` emails were accepted and return them (as `emails`);
        AssertionError listing what did arrive if `timeout` seconds pass first."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._emails) >= count, timeout=timeout):
                seen = [(e["custom_args"].get("message_id"), e["subject"]) for e in self._emails]
                raise AssertionError(f"expected at least {count} email(s) within {timeout}s, got {len(seen)}: {seen}")
            return self.emails

    def wait_for_event_posts(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least `count` event batches were posted (answered or not) and return
        them (as `event_posts`); AssertionError if `timeout` seconds pass first."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._posts) >= count, timeout=timeout):
                raise AssertionError(f"expected at least {count} event post(s) within {timeout}s, got {len(self._posts)}")
            return self.event_posts

    # ------------------------------------------------------------------ the Event Webhook (SendGrid -> bot)

    def signed_headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The headers SendGrid would send with `body` (timestamp: now unless given)."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        return {SIGNATURE_HEADER: sign(self.private_key, stamp, body), TIMESTAMP_HEADER: stamp,
                "Content-Type": "application/json", "User-Agent": "SendGrid Event API"}

    def event(self, email: Mapping[str, Any], name: str, **fields: Any) -> dict[str, Any]:
        """One event about an accepted `email` (an item of `emails`), shaped as SendGrid's: the
        common fields, our custom args top-level, then `fields`."""
        event = {
            "email": email["to"],
            "timestamp": int(time.time()),
            "event": name,
            "sg_event_id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="),
            "sg_message_id": f"{email['x_message_id']}.filterdrecv-sim-1-{secrets.token_hex(4)}.0",
            "smtp-id": f"<{email['x_message_id']}@sim.sendgrid.net>",
            "category": [],
        }
        event.update(email.get("custom_args") or {})
        event.update(fields)
        return event

    def post_events(self, events: list[dict[str, Any]], url: str | None = None, *,
                    timestamp: int | None = None) -> requests.Response:
        """POST `events` as one signed batch to `url` or `events_url`; recorded in `event_posts`."""
        target = url or self.events_url
        if not target:
            raise ValueError("post_events needs url= or an events_url")
        body = json.dumps(events).encode()
        entry: dict[str, Any] = {"url": target, "events": copy.deepcopy(events), "status_code": None,
                                 "error": None, "posted_at": time.time()}
        try:
            with requests.Session() as session:
                session.trust_env = False  # never route local webhooks through an environment proxy
                response = session.post(target, data=body, headers=self.signed_headers(body, timestamp),
                                        timeout=WEBHOOK_TIMEOUT)
            entry["status_code"] = response.status_code
            return response
        except requests.RequestException as exc:
            entry["error"] = repr(exc)
            raise
        finally:
            with self._cond:
                self._posts.append(entry)
                self._cond.notify_all()

    def _event_plan(self, email: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        reason = self.bouncing.get(email["to"].lower())
        if reason is None:
            return [("processed", {}), ("delivered", {"response": "250 OK", "ip": "127.0.0.1", "tls": 1})]
        if reason.startswith("dropped:"):
            return [("processed", {}), ("dropped", {"reason": reason.removeprefix("dropped:").strip()})]
        return [("processed", {}), ("bounce", {"reason": reason, "status": "5.1.1", "type": "bounce"})]

    def _auto_events(self, email: dict[str, Any], url: str, generation: int) -> None:
        """Background thread body: post one email's events to `url`, `event_delay` apart."""
        for name, fields in self._event_plan(email):
            # Wait first, so the bot has recorded the 202 before hearing about it.
            if self._stopping.wait(self.event_delay) or generation != self._generation:
                return
            try:
                self.post_events([self.event(email, name, **fields)], url)
            except Exception as exc:  # a dead receiver must never break the simulator
                log.warning("event %s for an email failed: %s", name, exc)

    # ------------------------------------------------------------------ the REST API (SDK -> SendGrid)

    def handle(self, request: Request) -> Response:
        """Answer one request under /v3/ (the Twilio simulator's server hands them here)."""
        try:
            if request.path.rstrip("/") != MAIL_SEND_PATH:
                raise _SendGridError(404, "resource not found")
            if request.method != "POST":
                raise _SendGridError(405, "method not allowed")
            return self._mail_send(request)
        except _SendGridError as exc:
            return exc.response()

    def _record_attempt(self, request: Request, status: int, body: Any) -> None:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        with self._cond:
            self._attempts.append({"status": status, "body": body, "headers": headers, "at": time.time()})

    def _mail_send(self, request: Request) -> Response:
        received_at = time.time()
        with self._cond:
            hang = self._hangs.pop(0) if self._hangs else None
            failure = self._failures.pop(0) if self._failures else None
            lost = self._lost_answers.pop(0) if self._lost_answers and failure is None else None
        raw = request.get_data(cache=True)
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        try:
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                raise _SendGridError(401, BAD_KEY)
            if failure is not None:
                if hang is not None:
                    self._stopping.wait(hang)
                raise _SendGridError(*failure)
            if len(raw) >= MAX_BODY_BYTES:
                raise _SendGridError(413, "The JSON payload you have included in your request is too large.")
            self._validate(payload)
        except _SendGridError as exc:
            self._record_attempt(request, exc.status, payload)
            return exc.response()
        if ((payload.get("mail_settings") or {}).get("sandbox_mode") or {}).get("enable"):
            self._record_attempt(request, 200, payload)
            return Response(status=200)  # sandbox mode: valid, not sent, no events
        email = self._store(payload, received_at)
        self._record_attempt(request, 202, payload)
        # Decided on acceptance, as SendGrid's events follow the email whether or not its answer
        # reaches the client (a hung or lost answer still produces them).
        url, generation = self.events_url, self._generation
        if url and self.auto_events:
            threading.Thread(target=self._auto_events, args=(email, url, generation), daemon=True).start()
        if self.latency:
            self._stopping.wait(self.latency)  # accepted on arrival, answered later
        if hang is not None:
            self._stopping.wait(hang)  # a slow SendGrid: accepted, only the answer is late
        log.info("email %s accepted: %r", email["x_message_id"], email["subject"])
        if lost == "drop":
            sock = request.environ.get("werkzeug.socket")
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        elif lost is not None:
            return Response(f"<html><body><h1>{lost} proxy error</h1></body></html>", status=int(lost),
                            mimetype="text/html")
        return Response(status=202, headers={"X-Message-Id": email["x_message_id"]})

    def _validate(self, payload: Any) -> None:
        """Refuse a body the way SendGrid does: 400 naming the field (403 for an unverified sender)."""
        if not isinstance(payload, dict):
            raise _SendGridError(400, "Bad Request", None)
        personalizations = payload.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            raise _SendGridError(400, "The personalizations field is required and must have at least one "
                                      "personalization.", "personalizations")
        recipients = 0
        for i, item in enumerate(personalizations):
            to = item.get("to") if isinstance(item, dict) else None
            if not isinstance(to, list) or not to:
                raise _SendGridError(400, "The to array is required for all personalization objects, and must have "
                                          "at least one email object with a valid email address.",
                                     f"personalizations.{i}.to")
            for j, recipient in enumerate(to):
                if not isinstance(recipient, dict) or not _valid_address(recipient.get("email")):
                    raise _SendGridError(400, "Does not contain a valid address.",
                                         f"personalizations.{i}.to.{j}.email")
            recipients += len(to)
        if recipients > MAX_RECIPIENTS:
            raise _SendGridError(400, "The personalizations field can contain at most 1000 recipients.",
                                 "personalizations")
        sender = payload.get("from")
        if not isinstance(sender, dict) or not _valid_address(sender.get("email")):
            raise _SendGridError(400, "The from object must be provided for every email send. It is an object that "
                                      "requires the email parameter, but may also contain a name parameter.", "from")
        template = payload.get("template_id")
        if not template and not (isinstance(payload.get("subject"), str) and payload["subject"].strip()) and not all(
                isinstance(p, dict) and p.get("subject") for p in personalizations):
            raise _SendGridError(400, "The subject is required. You can get around this requirement if you use a "
                                      "template with a subject defined or if every personalization has a subject "
                                      "defined.", "subject")
        content = payload.get("content")
        if not template and (not isinstance(content, list) or not content):
            raise _SendGridError(400, "Unless a valid template_id is provided, the content parameter is required. "
                                      "There must be at least one defined content block.", "content")
        for i, block in enumerate(content or []):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str) or not (
                    isinstance(block.get("value"), str) and block["value"]):
                raise _SendGridError(400, "The content value must be a string at least one character in length.",
                                     f"content.{i}.value")
        types = [block["type"] for block in content or []]
        if "text/plain" in types and types.index("text/plain") != 0:
            raise _SendGridError(400, "If present, text/plain content must be first, followed by any other "
                                      "content.", "content")
        for where, args in [("custom_args", payload.get("custom_args"))] + [
                (f"personalizations.{i}.custom_args", p.get("custom_args")) for i, p in enumerate(personalizations)]:
            if args is None:
                continue
            if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
                raise _SendGridError(400, "Custom args values must be strings.", where)
            if len(json.dumps(args).encode()) > MAX_CUSTOM_ARGS_BYTES:
                raise _SendGridError(400, "Custom args may not exceed 10,000 bytes.", where)
        headers = payload.get("headers")
        if headers is not None and (not isinstance(headers, dict)
                                    or not all(isinstance(v, str) for v in headers.values())):
            raise _SendGridError(400, "Header values must be strings.", "headers")
        if self.verified_senders is not None and sender["email"].lower() not in self.verified_senders:
            raise _SendGridError(403, UNVERIFIED_SENDER, "from")

    def _store(self, payload: dict[str, Any], received_at: float) -> dict[str, Any]:
        """Remember an accepted email (its first recipient: the bot sends one per request)."""
        first = payload["personalizations"][0]
        recipient = first["to"][0]
        blocks = {block["type"]: block["value"] for block in payload.get("content") or []}
        email = {
            "x_message_id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")[:22],
            "to": recipient["email"],
            "to_name": recipient.get("name"),
            "from": payload["from"]["email"],
            "from_name": payload["from"].get("name"),
            "subject": first.get("subject") or payload.get("subject"),
            "text": blocks.get("text/plain"),
            "html": blocks.get("text/html"),
            "headers": {**(payload.get("headers") or {}), **(first.get("headers") or {})},
            "custom_args": {**(payload.get("custom_args") or {}), **(first.get("custom_args") or {})},
            "body": copy.deepcopy(payload),
            "received_at": received_at,
        }
        with self._cond:
            self._emails.append(email)
            self._cond.notify_all()
        return email
