"""The channel seam (docs/ARCHITECTURE.md, "The channel seam"): the sender knows no provider, and
each channel answers the same small interface (bot/channels/base.py).

The end-to-end behaviour of each real channel is proven against the simulator elsewhere
(tests/delivery/test_delivery.py, test_unknown_fate.py, test_email_delivery.py). Here: both real channels
are registered and complete, each maps its provider's words at the edge, and a channel written
against the interface alone — no SDK at all, scripted answers — gets every guarantee of the
sender (ids recorded in its own column, retries and their limit, holds, "may have been accepted"
looked up before any resend, a wait not counted as an attempt).
"""
from __future__ import annotations

import inspect
from datetime import datetime, timedelta
from typing import Any, Callable

import pytest
import sqlalchemy as sa

from bot.channels.base import Channel as ChannelInterface
from bot.channels.base import Refusal, Wait
from bot.channels.email.channel import EmailChannel, unsure_grace
from bot.channels.outcomes import Accepted, Failed, Unknown
from bot.channels.whatsapp.callbacks import parse_status_callback
from bot.clock import utcnow
from bot.delivery import sender
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Contact, EmailEvent, Message
from bot.vocabulary import Channel, MessageStatus
from tests.conftest import make_contact

INTERFACE_METHODS = ("rate_key", "prepare", "open_sender", "open_lookup", "match")
INTERFACE_ATTRIBUTES = ("name", "provider_id_column", "callbacks_by_provider_id", "looks_up_at_once")


def test_every_channel_is_registered_and_implements_the_interface(app) -> None:
    """The tasks module registers one channel per value of `messages.channel`; each has every
    attribute and method of the interface, with its signature, and a real provider-id column."""
    assert set(sender.CHANNELS) == {channel.value for channel in Channel}
    columns = set(Message.__table__.c.keys())
    for name, channel in sender.CHANNELS.items():
        assert channel.name == name
        assert channel.provider_id_column in columns
        for attribute in INTERFACE_ATTRIBUTES:
            assert hasattr(channel, attribute), f"{name} lacks {attribute}"
        for method in INTERFACE_METHODS:
            wanted = list(inspect.signature(getattr(ChannelInterface, method)).parameters)[1:]
            assert list(inspect.signature(getattr(channel, method)).parameters) == wanted, f"{name}.{method}"
    assert sender.CHANNELS["whatsapp"].provider_id_column == "twilio_sid"
    assert sender.CHANNELS["email"].provider_id_column == "provider_message_id"


@pytest.mark.parametrize("form, status, mapped, code, text", [
    ({"MessageStatus": "Delivered "}, "delivered", MessageStatus.DELIVERED, None, None),
    ({"MessageStatus": "undelivered", "ErrorCode": "63024", "ErrorMessage": "not a WhatsApp user"},
     "undelivered", MessageStatus.UNDELIVERED, 63024, "not a WhatsApp user"),
    ({"MessageStatus": "failed", "ErrorCode": "", "ChannelStatusMessage": "blocked"},
     "failed", MessageStatus.FAILED, None, "blocked"),
    ({"MessageStatus": "teleported", "ErrorCode": "x9"}, "teleported", None, None, None),
    ({"MessageStatus": "read", "ErrorCode": str(2**31)}, "read", MessageStatus.READ, None, None),
])
def test_twilio_callbacks_are_mapped_at_the_edge(form, status, mapped, code, text) -> None:
    """Twilio's field and status names end in the WhatsApp channel: statuses.record_callback gets
    our vocabulary (an unknown name is kept as said, mapped to None: stored, not applied)."""
    callback = parse_status_callback({"MessageSid": "SM" + "a" * 32, **form})
    assert (callback.provider_id, callback.status, callback.mapped) == ("SM" + "a" * 32, status, mapped)
    assert (callback.error_code, callback.error_message) == (code, text)
    assert callback.payload["MessageStatus"] == form["MessageStatus"]


def test_the_email_lookup_takes_sendgrids_event_or_waits_out_the_grace(app) -> None:
    """SendGrid cannot be asked by our id: an event naming the message proves it was accepted;
    without one the channel says wait until the grace after the attempt is over, then send again."""
    channel = EmailChannel()
    with app.app_context():
        grace = unsure_grace()
        recent, long_ago = utcnow() - timedelta(seconds=5), utcnow() - grace - timedelta(seconds=5)
        message = type("Row", (), {"id": "m" * 32})()
        assert channel.match(message, {}, None, recent, set()) == Wait(recent + grace)
        assert channel.match(message, {}, None, long_ago, set()) is None
        db.session.add(EmailEvent(sg_event_id="ev1", message_id="m" * 32, event="processed",
                                  payload={"sg_message_id": "sg-42.filter0001.1.0"}))
        db.session.commit()
        assert channel.match(message, {}, None, long_ago, set()) == Accepted("sg-42", MessageStatus.ACCEPTED.value)


class ScriptedChannel:
    """A channel with no provider at all: it answers each send with the next scripted outcome,
    and each lookup with `found`. Only the interface is used; no SDK is involved or mocked."""

    name = Channel.WHATSAPP.value
    provider_id_column = "twilio_sid"
    callbacks_by_provider_id = False
    looks_up_at_once = True

    def __init__(self, answers: list[Any], found: Accepted | Wait | None = None) -> None:
        self.answers, self.found = list(answers), found
        self.sent: list[Any] = []
        self.looked_up: list[tuple[str, datetime]] = []

    def rate_key(self) -> str:
        return "scripted"

    def rate_per_second(self) -> int:
        return 1000

    def prepare(self, message: Any, contact: Contact, stop_waiting: bool) -> Any:
        if message.body == "refuse me":
            return Refusal(4242, "scripted refusal")
        return {"body": message.body}

    def open_sender(self) -> Callable[[Any, datetime], Any]:
        def send(request: Any, started: datetime) -> Any:
            self.sent.append(request)
            answer = self.answers.pop(0)
            return Unknown("scripted lost answer", started) if answer == "unknown" else answer
        return send

    def open_lookup(self) -> Callable[[Any], Any]:
        return lambda request: "fetched"

    def match(self, message: Any, request: Any, fetched: Any, since: datetime, exclude: set[str]) -> Any:
        assert fetched == "fetched"
        self.looked_up.append((message.id, since))
        return self.found


@pytest.fixture
def scripted(app, auth, monkeypatch):
    """Install a ScriptedChannel in WhatsApp's place; returns a function sending one message."""

    def send_with(channel: ScriptedChannel, body: str = "hello") -> tuple[sender.Outcome, Message]:
        monkeypatch.setitem(sender.CHANNELS, Channel.WHATSAPP.value, channel)
        response = app.test_client().post("/notify", json={"to": "+15551234567", "body": body},
                                          headers=auth)
        assert response.status_code == 202, response.get_json()
        huey.flush()
        message_id = response.get_json()["id"]
        outcome = sender.deliver(message_id)
        db.session.expire_all()
        return outcome, db.session.get(Message, message_id)

    with app.app_context():
        make_contact()
        yield send_with


def _due_now(message_id: str) -> None:
    db.session.execute(sa.update(Message).where(Message.id == message_id).values(next_attempt_at=utcnow()))
    db.session.commit()


def _fresh(message_id: str) -> Message:
    db.session.expire_all()
    return db.session.get(Message, message_id)


def test_an_accepted_send_is_recorded_in_the_channels_column(scripted) -> None:
    channel = ScriptedChannel([Accepted("scripted-1", MessageStatus.QUEUED.value)])
    outcome, message = scripted(channel)
    assert outcome == sender.Outcome.SENT
    assert (message.status, message.twilio_sid, message.attempts) == ("queued", "scripted-1", 1)
    assert channel.sent == [{"body": "hello"}]


def test_a_refusal_fails_the_message_without_a_send(scripted) -> None:
    channel = ScriptedChannel([])
    outcome, message = scripted(channel, "refuse me")
    assert outcome == sender.Outcome.REFUSED
    assert (message.status, message.error_code, message.error_message) == ("failed", 4242, "scripted refusal")
    assert channel.sent == []


def test_failures_retry_up_to_the_channels_limit_then_fail_with_its_code(scripted) -> None:
    channel = ScriptedChannel([Failed(7, "try later", retry=True, max_attempts=2)] * 2)
    outcome, message = scripted(channel)
    assert outcome == sender.Outcome.RETRY and message.status == "retrying" and message.error_code == 7
    message_id = message.id
    _due_now(message_id)
    assert sender.deliver(message_id) == sender.Outcome.FAILED  # the channel allows two attempts, not 15
    failed = _fresh(message_id)
    assert (failed.status, failed.error_code, failed.attempts) == ("failed", 7, 2)
    permanent = ScriptedChannel([Failed(8, "never", retry=False)])
    outcome, message = scripted(permanent, "another")
    assert (outcome, message.status, message.error_code) == (sender.Outcome.FAILED, "failed", 8)


def test_a_hold_keeps_the_message_and_never_counts_the_attempt(scripted) -> None:
    channel = ScriptedChannel([Failed(401, "Maximum credits exceeded", retry=True, hold=True)])
    outcome, message = scripted(channel)
    assert outcome == sender.Outcome.RETRY
    assert (message.status, message.attempts, message.error_message) == (
        "retrying", 0, "held: Maximum credits exceeded")
    assert message.next_attempt_at - utcnow() > sender.HOLD_DELAY - timedelta(seconds=30)


def test_a_lost_answer_is_looked_up_at_once_and_before_any_resend(scripted) -> None:
    """Unknown: looked up in the same batch (not found: retrying, unsure); the next attempt looks
    up first and, found, records the provider's id without sending again."""
    channel = ScriptedChannel(["unknown"])
    outcome, message = scripted(channel)
    assert outcome == sender.Outcome.RETRY
    assert message.status == "retrying" and message.unsure_since is not None
    message_id = message.id
    assert [looked_up for looked_up, _ in channel.looked_up] == [message_id]
    channel.found = Accepted("found-at-the-provider", MessageStatus.SENT.value)
    _due_now(message_id)
    assert sender.deliver(message_id) == sender.Outcome.SENT
    settled = _fresh(message_id)
    assert (settled.status, settled.twilio_sid, settled.unsure_since) == ("sent", "found-at-the-provider", None)
    assert len(channel.sent) == 1 and len(channel.looked_up) == 2


def test_a_channel_that_cannot_tell_yet_makes_the_message_wait_uncounted(scripted) -> None:
    """`Wait` (email: SendGrid's events have not come): no send, the attempt not counted, due at
    the channel's time, still unsure."""
    channel = ScriptedChannel(["unknown"])
    channel.looks_up_at_once = False  # as email: nothing to ask in the same batch
    outcome, message = scripted(channel)
    assert outcome == sender.Outcome.RETRY and channel.looked_up == []
    until = utcnow() + timedelta(minutes=7)
    channel.found = Wait(until)
    message_id = message.id
    _due_now(message_id)
    attempts = _fresh(message_id).attempts
    assert sender.deliver(message_id) == sender.Outcome.RETRY
    waiting = _fresh(message_id)
    assert (waiting.status, waiting.attempts, waiting.next_attempt_at) == ("retrying", attempts, until)
    assert waiting.unsure_since is not None and len(channel.sent) == 1
