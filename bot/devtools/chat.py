"""`flask chat`: be a WhatsApp user in the terminal, talking to the running bot.

Each line becomes a signed inbound webhook, posted to the bot exactly as Twilio posts it; the
bot's replies are read back from the Twilio Messages API (the simulator in development mode)
with the official SDK, and shown with WhatsApp's delivery ticks as the status callbacks move
them on. In development mode the emails the bot sends (to anyone) are shown as they reach the
simulator's SendGrid side, and `/emails` prints them in full.

The core (:class:`ChatSession`) does no terminal I/O, so tests drive it directly; :func:`run_repl`
is the read-send-show loop, and :data:`chat_command` the click command around it.
"""
from __future__ import annotations

import mimetypes
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import click
import requests
from flask import current_app
from flask.cli import with_appcontext
from twilio.base.exceptions import TwilioException
from twilio.rest import Client

from bot.devmode import is_loopback_url
from bot.phone import InvalidNumber, normalize_e164
from bot.devtools.simulator import API_VERSION, SIMULATOR_EMAILS_PATH, sign

__all__ = ["ChatError", "ChatEvent", "ChatSession", "ticks", "run_repl", "chat_command", "HELP"]

DEFAULT_WEBHOOK_URL = "http://127.0.0.1:5000/twilio/webhook"
DEFAULT_PHONE = "+15551234567"
DEFAULT_NAME = "Developer"
#: How far `/wait` moves the clock: past every flow's timeout.
TIMEOUT_JUMP = timedelta(days=30)
#: Seconds to wait for the bot's answer to a webhook post.
POST_TIMEOUT = 10.0
#: How many of the contact's messages one poll reads (newest first, as Twilio lists them).
POLL_LIMIT = 50

PENDING_STATUSES = frozenset({"queued", "accepted", "sending", "scheduled"})
FAILED_STATUSES = frozenset({"failed", "undelivered"})

HELP = """\
Type a line and press Enter to send it as a WhatsApp message. An empty line checks for new messages.
  /button PAYLOAD [label text]          press a quick-reply button
  /location LAT LON [address...]        share a location
  /media URL [content-type] [caption]   send a picture or document by URL
  /wait                                 wait out the conversation's timeout (no real waiting)
  /events [N]                           the last N (10) events your typing caused for the backend
  /timeline                             the dashboard's page of the bot's last message (its whole story)
  /help                                 this help
  /quit                                 leave (Ctrl-D works too)"""


class ChatError(Exception):
    """Something the developer should read: the server refused a message, or is unreachable."""


def ticks(status: str | None, error_code: int | str | None = None) -> str:
    """A message status as WhatsApp shows it: 🕓, ✓, ✓✓, ✓✓ (read), ✗ <error code>."""
    status = (status or "").lower()
    if status in PENDING_STATUSES:
        return "🕓"
    if status == "sent":
        return "✓"
    if status == "delivered":
        return "✓✓"
    if status == "read":
        return "✓✓ (read)"
    if status in FAILED_STATUSES:
        return f"✗ {error_code}" if error_code not in (None, "") else "✗"
    return f"({status})" if status else ""


@dataclass(frozen=True)
class ChatEvent:
    """What a poll found: a new bot message (kind "message"), a new status of one ("status"), or
    an email the bot sent to anyone (kind "email", development mode)."""

    kind: str
    sid: str
    status: str | None
    body: str | None = None
    error_code: int | None = None
    num_media: int = 0
    #: An email's recipient (kind "email": `body` is its subject).
    to: str | None = None

    def render(self) -> str:
        """One line (a multi-line body continues indented): "bot: ... ✓✓" or "   ↳ read ✓✓"."""
        if self.kind == "email":
            return f"📧 email to {self.to}: {self.body or '(no subject)'}   (/emails shows it)"
        if self.kind == "status":
            mark = ticks(self.status, self.error_code).removesuffix(" (read)")
            return f"   ↳ {self.status} {mark}".rstrip()
        body = self.body or ("" if self.num_media else "(a template message)")
        if self.num_media:
            body = f"{body} [{self.num_media} media]".strip()
        text = f"bot: {body} {ticks(self.status, self.error_code)}".rstrip()
        return text.replace("\n", "\n     ")


class ChatSession:
    """One WhatsApp user (`phone`) talking to the bot: signed webhooks out, SDK reads back.

    Messages the bot had already sent to `phone` before the session started are not shown.
    """

    def __init__(self, *, phone: str, profile_name: str | None, webhook_url: str, auth_token: str,
                 account_sid: str, bot_number: str, client: Client, emails_url: str | None = None) -> None:
        """`emails_url`: the simulator's `/_emails` (development mode); None shows no email."""
        try:
            self.phone = normalize_e164(phone)
        except InvalidNumber as exc:
            raise ChatError(f"{phone!r} {exc}") from None
        self.profile_name = profile_name
        self.webhook_url = webhook_url
        self.account_sid = account_sid
        self.bot_number = bot_number if bot_number.startswith("whatsapp:") else "whatsapp:" + bot_number
        self.client = client
        self._auth_token = auth_token
        self._http = requests.Session()
        # A local server must never be reached through an environment proxy (as the simulator does).
        self._http.trust_env = not is_loopback_url(webhook_url)
        self._statuses: dict[str, str | None] = {}  # sid -> last status shown
        # The REPL polls from a background thread too (messages that arrive while you type).
        self._poll_lock = threading.Lock()
        self._ignored: set[str] = {m.sid for m in self._list()}  # there before the session started
        self.emails_url = emails_url
        self._emails_http = requests.Session()
        self._emails_http.trust_env = False  # the simulator is local: never through a proxy
        self._emails_seen: set[str] = {e["id"] for e in self.emails()} if emails_url else set()

    def __repr__(self) -> str:  # never shows the auth token
        return f"<ChatSession {self.phone} -> {self.webhook_url}>"

    @classmethod
    def from_app(cls, app_config: Mapping[str, Any] | None = None, phone: str = DEFAULT_PHONE,
                 profile_name: str | None = DEFAULT_NAME) -> "ChatSession":
        """A session configured like the running server (inside its app context)."""
        from bot.channels.whatsapp.client import get_client

        config = current_app.config if app_config is None else app_config
        emails_url = None
        sendgrid_url = config.get("SENDGRID_API_URL") or ""
        if config.get("DEV_MODE") and config.get("SENDGRID_API_KEY") and is_loopback_url(sendgrid_url):
            emails_url = sendgrid_url.rstrip("/") + SIMULATOR_EMAILS_PATH  # the simulator plays SendGrid
        return cls(
            phone=phone,
            profile_name=profile_name,
            webhook_url=config.get("TWILIO_WEBHOOK_URL") or DEFAULT_WEBHOOK_URL,
            auth_token=config["TWILIO_AUTH_TOKEN"],
            account_sid=config["TWILIO_ACCOUNT_SID"],
            bot_number=config["TWILIO_WHATSAPP_NUMBER"],
            client=get_client(),
            emails_url=emails_url,
        )

    def timeline_url(self, sid: str) -> str:
        """The dashboard's page of the message Twilio knows as `sid`, on the server this chat
        writes to (bot/dashboard; bin/dev prints a link that signs you in)."""
        parts = urlsplit(self.webhook_url)
        return f"{parts.scheme}://{parts.netloc}/dashboard/sid/{sid}"

    @property
    def last_message_sid(self) -> str | None:
        """The SID of the bot's newest message shown in this session, if any."""
        return next(reversed(self._statuses), None)

    @property
    def api_url(self) -> str:
        """Where the SDK reads the bot's messages (Twilio, or the simulator)."""
        return self.client.api.base_url

    # ------------------------------------------------------------------ sending (user -> bot)

    def send(self, text: str) -> None:
        """Send a text message, as Twilio posts one to the bot's webhook."""
        self._post({"Body": text})

    def button(self, payload: str, text: str | None = None) -> None:
        """Press a quick-reply button: its payload, and its label (`text`, default the payload)."""
        self._post({"Body": text or payload, "ButtonPayload": payload, "ButtonText": text or payload,
                    "MessageType": "button"})

    def location(self, latitude: float, longitude: float, address: str | None = None,
                 label: str | None = None) -> None:
        """Share a location (with an optional address and place name)."""
        fields: dict[str, Any] = {"Body": "", "Latitude": str(latitude), "Longitude": str(longitude),
                                  "MessageType": "location"}
        if address:
            fields["Address"] = address
        if label:
            fields["Label"] = label
        self._post(fields)

    def media(self, url: str, content_type: str = "image/jpeg", caption: str = "") -> None:
        """Send one picture (or document, video, audio) by URL, with an optional caption."""
        kind = content_type.split("/", 1)[0].lower()
        message_type = kind if kind in ("image", "video", "audio") else "document"
        self._post({"Body": caption, "NumMedia": "1", "MediaUrl0": url, "MediaContentType0": content_type,
                    "MessageType": message_type})

    def _post(self, fields: Mapping[str, Any]) -> None:
        sid = "SM" + uuid.uuid4().hex
        params: dict[str, str] = {
            "MessageSid": sid,
            "SmsSid": sid,
            "SmsMessageSid": sid,
            "AccountSid": self.account_sid,
            "From": "whatsapp:" + self.phone,
            "To": self.bot_number,
            "Body": "",
            "NumMedia": "0",
            "NumSegments": "1",
            "SmsStatus": "received",
            "ApiVersion": API_VERSION,
            "WaId": self.phone.lstrip("+"),
            "MessageType": "text",
        }
        if self.profile_name:
            params["ProfileName"] = self.profile_name
        params.update({k: str(v) for k, v in fields.items() if v is not None})
        headers = {
            "X-Twilio-Signature": sign(self._auth_token, self.webhook_url, params),
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
        }
        try:
            response = self._http.post(self.webhook_url, data=params, headers=headers, timeout=POST_TIMEOUT)
        except requests.RequestException as exc:
            raise ChatError(self._redact(
                f"cannot reach the bot at {self.webhook_url} ({type(exc).__name__}): is the server running? "
                "(bin/dev starts it)")) from None
        if not 200 <= response.status_code < 300:
            detail = _error_detail(response)
            hint = ""
            if response.status_code == 403:
                hint = (" The signature was refused: the chat's TWILIO_AUTH_TOKEN must be the server's, and "
                        "TWILIO_WEBHOOK_URL exactly the URL the chat posts to.")
            raise ChatError(self._redact(
                f"the bot at {self.webhook_url} answered HTTP {response.status_code}"
                f"{': ' + detail if detail else ''}.{hint}"))

    def _redact(self, text: str) -> str:
        token = self._auth_token
        return text.replace(token, "***") if token and len(token) >= 4 else text

    # ------------------------------------------------------------------ reading (bot -> user)

    def _list(self) -> list[Any]:
        """The bot's messages to this user, oldest first, through the real SDK."""
        try:
            newest_first = self.client.messages.list(to="whatsapp:" + self.phone, limit=POLL_LIMIT)
        except requests.RequestException as exc:
            raise ChatError(self._redact(
                f"cannot reach the Twilio API at {self.api_url} ({type(exc).__name__})")) from None
        except TwilioException as exc:
            raise ChatError(self._redact(
                f"cannot read messages from the Twilio API at {self.api_url}: {exc}")) from None
        return list(reversed(newest_first))

    def emails(self) -> list[dict[str, Any]]:
        """Every email the simulator's SendGrid side accepted, oldest first (`GET /_emails`);
        [] without an `emails_url`."""
        if not self.emails_url:
            return []
        try:
            response = self._emails_http.get(self.emails_url, timeout=POST_TIMEOUT,
                                             headers={"Accept": "application/json"})
            response.raise_for_status()
            return list(response.json()["emails"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            raise ChatError(f"cannot read the emails at {self.emails_url} ({type(exc).__name__}): "
                            "is the simulator running? (bin/dev starts it)") from None

    def poll(self) -> list[ChatEvent]:
        """New bot messages and new statuses of messages already shown, oldest first.

        Thread-safe: each event is returned by exactly one call.
        """
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        for message in self._list():
            sid, status = message.sid, message.status
            if sid in self._ignored:
                continue
            error_code = message.error_code
            if sid not in self._statuses:
                try:
                    num_media = int(message.num_media or 0)
                except (TypeError, ValueError):
                    num_media = 0
                events.append(ChatEvent("message", sid, status, message.body or "", error_code, num_media))
            elif self._statuses[sid] != status:
                events.append(ChatEvent("status", sid, status, error_code=error_code))
            self._statuses[sid] = status
        for email in self.emails():
            if email["id"] not in self._emails_seen:
                self._emails_seen.add(email["id"])
                events.append(ChatEvent("email", email["id"], None, email.get("subject"), to=email.get("to")))
        return events

    def wait_for(self, predicate_or_count: int | Callable[[list[ChatEvent]], Any] = 1,
                 timeout: float = 15.0, interval: float = 0.2) -> list[ChatEvent]:
        """Poll until enough new bot messages arrived; return every event seen meanwhile.

        An int waits for that many "message" events; a callable is given the events seen so far
        and waits until it returns true. Raises ChatError after `timeout` seconds, listing what
        did arrive.
        """
        if callable(predicate_or_count):
            done = predicate_or_count
            wanted = "the expected events"
        else:
            count = int(predicate_or_count)
            done = lambda events: sum(e.kind == "message" for e in events) >= count  # noqa: E731
            wanted = f"{count} bot message(s)"
        events: list[ChatEvent] = []
        deadline = time.monotonic() + timeout
        while True:
            events.extend(self.poll())
            if done(events):
                return events
            if time.monotonic() >= deadline:
                seen = [e.render() for e in events] or ["nothing"]
                raise ChatError(f"expected {wanted} within {timeout:g}s; got: " + " | ".join(seen))
            time.sleep(interval)

    # ------------------------------------------------------------------ time travel

    def recent_events(self, limit: int = 10) -> list[dict[str, Any]]:
        """This contact's latest events to the backend, oldest first (GET /events' shape).

        Needs the Flask app context: read from the server's database, whatever became of their push.
        """
        import sqlalchemy as sa

        from bot.extensions import db
        from bot.models import Contact, Event

        db.session.rollback()
        rows = db.session.scalars(
            sa.select(Event).join(Contact, Contact.id == Event.contact_id).where(Contact.phone == self.phone)
            .order_by(Event.seq.desc()).limit(limit)).all()
        answer = [event.to_dict() for event in reversed(rows)]
        db.session.rollback()
        return answer

    def expire_timeouts(self) -> int:
        """Run this contact's conversation timeouts as if they had all passed; returns how many.

        Needs the Flask app context (the engine works on the server's database); replies the
        timeout handlers send go through the queue to the worker, like any other.
        """
        import sqlalchemy as sa

        from bot.clock import utcnow
        from bot.conversations.engine import expire_conversations
        from bot.extensions import db
        from bot.models import Contact

        db.session.rollback()  # start from a fresh transaction: the worker has moved things on
        contact_id = db.session.scalar(sa.select(Contact.id).where(Contact.phone == self.phone))
        if contact_id is None:
            db.session.rollback()
            return 0
        return expire_conversations(now=utcnow() + TIMEOUT_JUMP, contact_id=contact_id)


def _error_detail(response: requests.Response) -> str:
    """The server's `error` message (JSON), else the start of its body."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and payload.get("error"):
        return str(payload["error"])[:200]
    return " ".join(response.text.split())[:200]


# ---------------------------------------------------------------------- the REPL

PROMPT = "you> "


class _IdleWatcher:
    """While the REPL waits for a line, show what the bot sends on its own.

    Notifications from the backend, a flow the backend starts, a timeout nudge: none of them
    answers a line you typed, so without this they would wait for your next Enter.
    """

    def __init__(self, session: ChatSession, write: Callable[[str], Any], redraw: Callable[[], Any],
                 interval: float) -> None:
        self._session, self._write, self._redraw, self._interval = session, write, redraw, interval
        self._idle = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chat-watcher", daemon=True)

    def __enter__(self) -> "_IdleWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._idle.set()  # wake the thread so it sees the stop
        self._thread.join(timeout=5)

    def idle(self) -> None:
        """The REPL is waiting for the user: watch."""
        self._idle.set()

    def busy(self) -> None:
        """The REPL is handling a line and shows events itself."""
        self._idle.clear()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._idle.wait()
            if self._stopped.wait(self._interval) or not self._idle.is_set():
                continue
            try:
                events = self._session.poll()
            except ChatError:
                continue  # the main loop reports errors when the user acts; don't spam the prompt
            if events and self._idle.is_set():
                self._write("")  # leave the prompt's line
                for event in events:
                    self._write(event.render())
                self._redraw()
            elif events:  # the user pressed Enter meanwhile: show them anyway, in order
                for event in events:
                    self._write(event.render())


def _redraw_prompt() -> None:
    """Print the prompt again, with whatever the user had typed so far."""
    typed = ""
    try:
        import readline

        typed = readline.get_line_buffer()
    except (ImportError, AttributeError):  # no readline (e.g. Windows): the prompt alone
        pass
    click.echo(PROMPT + typed, nl=False)


def run_repl(session: ChatSession, read_line: Callable[[str], str] = input,
             write: Callable[[str], Any] = click.echo, poll_interval: float = 0.3, *,
             reply_timeout: float = 5.0, settle: float = 1.0, watch_interval: float | None = 1.0,
             redraw: Callable[[], Any] = _redraw_prompt) -> None:
    """Read lines until EOF or /quit; send each; show the bot's replies and their ticks.

    `read_line` is called like input(), with the prompt. After each message it waits up to
    `reply_timeout` seconds for a reply (never failing when none comes), then keeps showing
    events until `settle` seconds pass without any. While it waits for a line, a background
    watcher polls every `watch_interval` seconds (None: never) and shows what arrives, then
    `redraw`s the prompt.
    """
    if watch_interval is None:
        _loop(session, read_line, write, poll_interval, reply_timeout, settle, None)
        return
    with _IdleWatcher(session, write, redraw, watch_interval) as watcher:
        _loop(session, read_line, write, poll_interval, reply_timeout, settle, watcher)


def _loop(session: ChatSession, read_line: Callable[[str], str], write: Callable[[str], Any],
          poll_interval: float, reply_timeout: float, settle: float, watcher: _IdleWatcher | None) -> None:
    def show(events: list[ChatEvent]) -> None:
        for event in events:
            write(event.render())
            if event.kind in ("message", "status") and (event.status or "").lower() in FAILED_STATUSES:
                write(f"   ↳ why: {session.timeline_url(event.sid)}")

    def drain() -> None:
        try:
            show(session.poll())
        except ChatError as exc:
            write(f"error: {exc}")

    def await_replies() -> None:
        try:
            _await_replies()
        except KeyboardInterrupt:  # Ctrl-C stops waiting, not the chat
            write("")

    def _await_replies() -> None:
        deadline = time.monotonic() + reply_timeout
        got_message = False
        last_event = time.monotonic()
        while True:
            try:
                events = session.poll()
            except ChatError as exc:
                write(f"error: {exc}")
                return
            show(events)
            now = time.monotonic()
            if events:
                last_event = now
                got_message = got_message or any(e.kind == "message" for e in events)
            if got_message and now - last_event >= settle:
                return
            if not got_message and now >= deadline:
                write(f"   (no reply within {reply_timeout:g}s)")
                return
            if got_message and now >= deadline + settle * 4:  # a chatty bot: stop anyway
                return
            time.sleep(poll_interval)

    while True:
        if watcher is not None:
            watcher.idle()
        try:
            line = read_line(PROMPT)
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        finally:
            if watcher is not None:
                watcher.busy()
        line = line.strip()
        drain()  # anything that arrived while the user was typing
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            command, rest = command.lower(), rest.strip()
            if command in ("/quit", "/exit", "/q"):
                break
            if command in ("/help", "/?"):
                write(HELP)
                continue
            handler = _COMMANDS.get(command)
            if handler is None:
                write(f"unknown command {command}")
                write(HELP)
                continue
            try:
                wait = handler(session, rest, write)
            except _Usage as exc:
                write(f"usage: {exc}")
                continue
            except ChatError as exc:
                write(f"error: {exc}")
                continue
            except RuntimeError as exc:  # e.g. /wait outside the Flask app context
                write(f"error: {exc}")
                continue
            if wait:
                await_replies()
            continue
        try:
            session.send(line)
        except ChatError as exc:
            write(f"error: {exc}")
            continue
        await_replies()
    drain()


_CONTENT_TYPE = re.compile(r"^(image|video|audio|application|text)/[\w.+-]+$", re.IGNORECASE)


class _Usage(Exception):
    """A slash command used wrongly: the message is its usage line."""


def _cmd_button(session: ChatSession, rest: str, write: Callable[[str], Any]) -> bool:
    payload, _, label = rest.partition(" ")
    if not payload:
        raise _Usage("/button PAYLOAD [label text]   e.g. /button 5  or  /button CONFIRM Confirm")
    label = label.strip() or None
    session.button(payload, label)
    write(f"you: [button] {label or payload}" + (f" (payload {payload})" if label else ""))
    return True


def _cmd_location(session: ChatSession, rest: str, write: Callable[[str], Any]) -> bool:
    usage = "/location LAT LON [address...]   e.g. /location 51.5034 -0.1276 10 Downing Street, London"
    parts = rest.split(None, 2)
    if len(parts) < 2:
        raise _Usage(usage)
    try:
        latitude, longitude = float(parts[0].rstrip(",")), float(parts[1])
    except ValueError:
        raise _Usage(usage) from None
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
        raise _Usage("latitude must be within -90..90 and longitude within -180..180")
    address = parts[2].strip() if len(parts) > 2 else None
    session.location(latitude, longitude, address)
    write(f"you: [location] {latitude}, {longitude}" + (f" {address}" if address else ""))
    return True


def _cmd_media(session: ChatSession, rest: str, write: Callable[[str], Any]) -> bool:
    usage = "/media URL [content-type] [caption...]   e.g. /media https://example.com/cat.jpg image/jpeg"
    parts = rest.split(None, 1)
    if not parts or not parts[0].lower().startswith(("http://", "https://")):
        raise _Usage(usage)
    url, tail = parts[0], (parts[1].strip() if len(parts) > 1 else "")
    first, _, more = tail.partition(" ")
    if _CONTENT_TYPE.match(first):
        content_type, caption = first, more.strip()
    else:
        content_type = mimetypes.guess_type(urlsplit(url).path)[0] or "image/jpeg"
        caption = tail
    session.media(url, content_type, caption)
    write(f"you: [{content_type}] {url}" + (f" {caption}" if caption else ""))
    return True


def _cmd_wait(session: ChatSession, rest: str, write: Callable[[str], Any]) -> bool:
    count = session.expire_timeouts()
    if count == 0:
        write("(no conversation was waiting for an answer: nothing timed out)")
        return False
    write(f"({count} conversation{'s' if count != 1 else ''} timed out)")
    return True


def _cmd_events(session: ChatSession, rest: str, write: Callable[[str], Any]) -> bool:
    if rest and not (rest.isdigit() and 1 <= int(rest) <= 200):
        raise _Usage("/events [N]   the last N events (1-200), e.g. /events 20")
    events = session.recent_events(int(rest) if rest else 10)
    if not events:
        write("(no events for you yet)")
    for event in events:
        data = event["data"]
        detail = data.get("status") or data.get("body") or data.get("outcome") or data.get("source") or ""
        write(f"   {event['timestamp']} {event['type']:<24} {str(detail)[:50]:<50} "
              f"[{event['delivery']['status']}]")
    return False


def _cmd_emails(session: ChatSession, rest: str, write: Callable[[str], Any]) -> bool:
    if rest and not (rest.isdigit() and 1 <= int(rest) <= 200):
        raise _Usage("/emails [N]   the last N emails (1-200), e.g. /emails 3")
    if not session.emails_url:
        write("(emails are shown in development mode only: the simulator plays SendGrid there)")
        return False
    emails = session.emails()[-(int(rest) if rest else 5):]
    if not emails:
        write("(no email yet)")
    for email in emails:
        events = ", ".join(email.get("events") or []) or "no event yet"
        write(f"📧 {email['received_at']} to {email['to']} from {email.get('from_name') or ''} <{email['from']}>")
        write(f"   Subject: {email.get('subject') or '(no subject)'}   [{events}]")
        for line in (email.get("text") or "").splitlines():
            write(f"   | {line}")
    return False


def _cmd_timeline(session: ChatSession, rest: str, write: Callable[[str], Any]) -> bool:
    sid = session.last_message_sid
    write(f"   {session.timeline_url(sid)}" if sid else "(the bot has sent you nothing yet)")
    return False


_COMMANDS: dict[str, Callable[[ChatSession, str, Callable[[str], Any]], bool]] = {
    "/events": _cmd_events,
    "/timeline": _cmd_timeline,
    "/emails": _cmd_emails,
    "/button": _cmd_button,
    "/location": _cmd_location,
    "/media": _cmd_media,
    "/wait": _cmd_wait,
}


# ---------------------------------------------------------------------- flask chat


def _phone_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return normalize_e164(value)
    except InvalidNumber as exc:
        raise click.BadParameter(f"{value!r} is not a usable phone number: it {exc}, "
                                 "e.g. +15551234567") from None


@click.command("chat")
@click.option("--as", "phone", default=DEFAULT_PHONE, show_default=True, callback=_phone_option,
              help="Your WhatsApp number (E.164).")
@click.option("--name", "profile_name", default=DEFAULT_NAME, show_default=True,
              help="Your WhatsApp profile name.")
@with_appcontext
def chat_command(phone: str, profile_name: str) -> None:
    """Chat with the running bot as a WhatsApp user (signed webhooks, real replies and ticks)."""
    config = current_app.config
    try:
        session = ChatSession.from_app(config, phone, profile_name)
    except ChatError as exc:
        hint = ("Is the simulator running? bin/dev starts web, worker and simulator." if config.get("DEV_MODE")
                else "Check TWILIO_API_URL and the Twilio credentials (python -m bot.doctor).")
        raise click.ClickException(f"{exc}\n{hint}") from None
    dev = bool(config.get("DEV_MODE"))
    click.echo(f"You are {profile_name or 'a WhatsApp user'} ({session.phone}) on WhatsApp, "
               f"writing to the bot at {session.bot_number}.")
    click.echo(f"  messages go to   {session.webhook_url} (signed like Twilio's webhooks)")
    click.echo(f"  replies read at  {session.api_url}"
               + (" (the local Twilio simulator)" if dev else " (the Twilio API)"))
    if session.emails_url:
        click.echo(f"  emails shown from {session.emails_url} (the local SendGrid simulator)")
    if not dev:
        click.secho("  Not in development mode: the bot's replies are real WhatsApp messages to "
                    f"{session.phone}.", fg="yellow")
    click.echo(HELP)
    click.echo()
    try:  # line editing and history for input(), and what the watcher redraws after a message
        import readline  # noqa: F401
    except ImportError:
        pass
    run_repl(session)
