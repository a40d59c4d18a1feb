"""No poison message: a turn that keeps failing on a database error retrying cannot fix is given
up on after a bounded number of attempts (invariant 6: the contact's next message goes on), a
transient error is retried without limit, and the sweep holds inbound rows and starting
conversations off as it holds outbound ones (invariant 1)."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from bot.clock import utcnow
from bot.conversations import engine
from bot.delivery import outbox
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Contact, Conversation, Message
from bot.vocabulary import Consent, ConversationStatus, Direction, MessageStatus
from tests.conftest import inbound_form, make_contact, run_queue

PHONE = "+15551234567"
POISON = "poison pill"


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield


def violate_a_constraint(contact_id: int) -> None:
    """A real database error that every retry hits again: a second contact with the same phone."""
    phone = db.session.scalar(sa.select(Contact.phone).where(Contact.id == contact_id))
    db.session.execute(sa.insert(Contact).values(phone=phone, consent=Consent.UNKNOWN))


@pytest.fixture
def poisoned_turns(monkeypatch):
    """Every turn of a message whose body is POISON fails with a real IntegrityError."""
    real = engine.handle_message

    def handle(contact, message):
        if message.body == POISON:
            violate_a_constraint(contact.id)
        return real(contact, message)

    monkeypatch.setattr(engine, "handle_message", handle)


def inbound(body: str) -> Message:
    db.session.expire_all()
    return db.session.scalar(sa.select(Message).where(Message.direction == Direction.INBOUND, Message.body == body))


def replies_to(phone: str = PHONE) -> list[Message]:
    db.session.expire_all()
    return list(db.session.scalars(
        sa.select(Message).join(Contact).where(Contact.phone == phone, Message.direction == Direction.OUTBOUND)))


def test_a_poison_message_is_failed_after_bounded_turns_and_the_next_one_is_answered(
        ctx, post_webhook, poisoned_turns, client, auth):
    make_contact(PHONE)
    assert post_webhook(inbound_form(PHONE, POISON)).status_code == 200
    assert post_webhook(inbound_form(PHONE, "HELP")).status_code == 200
    run_queue()  # the tasks and their retries, as a consumer would run them

    poison = inbound(POISON)
    assert poison.status == MessageStatus.FAILED
    assert poison.attempts == engine.MAX_TURN_ATTEMPTS
    assert "IntegrityError" in poison.error_message and "gave up" in poison.error_message
    assert inbound("HELP").status == MessageStatus.PROCESSED
    assert len(replies_to()) == 1  # HELP answered; the poison turn left nothing behind
    shown = client.get(f"/messages/{poison.id}", headers=auth).get_json()
    assert (shown["status"], shown["attempts"]) == ("failed", engine.MAX_TURN_ATTEMPTS)

    # Nothing more to do: the sweep does not bring the failed message back.
    assert outbox.sweep(utcnow() + timedelta(hours=1))["inbound"] == 0


def test_a_transient_error_is_retried_and_never_counts_towards_giving_up(ctx, post_webhook, monkeypatch):
    make_contact(PHONE)
    assert post_webhook(inbound_form(PHONE, "flaky")).status_code == 200
    assert post_webhook(inbound_form(PHONE, "HELP")).status_code == 200
    huey.flush()  # the turns are run by hand below, one by one
    flaky_id = inbound("flaky").id
    errors = ["locked"] * (engine.MAX_TURN_ATTEMPTS + 2) + ["integrity"] * engine.MAX_TURN_ATTEMPTS
    real = engine.handle_message

    def handle(contact, message):
        if message.body == "flaky" and errors:
            if errors.pop(0) == "locked":
                raise OperationalError("UPDATE contacts", {}, Exception("database is locked"))
            violate_a_constraint(contact.id)
        return real(contact, message)

    monkeypatch.setattr(engine, "handle_message", handle)
    for _ in range(engine.MAX_TURN_ATTEMPTS + 2):
        with pytest.raises(OperationalError):
            engine.process_inbound(flaky_id)
    flaky = inbound("flaky")
    assert (flaky.status, flaky.attempts, flaky.error_message) == (MessageStatus.RECEIVED, 0, None)
    assert inbound("HELP").status == MessageStatus.RECEIVED  # still waits its turn (invariant 6)

    for attempt in range(1, engine.MAX_TURN_ATTEMPTS):
        with pytest.raises(IntegrityError):
            engine.process_inbound(flaky_id)
        assert (inbound("flaky").status, inbound("flaky").attempts) == (MessageStatus.RECEIVED, attempt)
    engine.process_inbound(inbound("HELP").id)  # the last failing turn gives up, then HELP goes
    assert (inbound("flaky").status, inbound("flaky").attempts) == (MessageStatus.FAILED, engine.MAX_TURN_ATTEMPTS)
    assert inbound("HELP").status == MessageStatus.PROCESSED


def test_a_message_that_recovers_before_the_limit_is_processed(ctx, post_webhook, monkeypatch):
    make_contact(PHONE)
    assert post_webhook(inbound_form(PHONE, "HELP")).status_code == 200
    huey.flush()
    failures = [1] * (engine.MAX_TURN_ATTEMPTS - 1)
    real = engine.handle_message

    def handle(contact, message):
        if failures:
            failures.pop()
            violate_a_constraint(contact.id)
        return real(contact, message)

    monkeypatch.setattr(engine, "handle_message", handle)
    message_id = inbound("HELP").id
    for _ in range(engine.MAX_TURN_ATTEMPTS - 1):
        with pytest.raises(IntegrityError):
            engine.process_inbound(message_id)
    held = inbound("HELP")
    assert held.next_attempt_at is not None and held.next_attempt_at > utcnow()  # the sweep waits
    engine.process_inbound(message_id)
    assert inbound("HELP").status == MessageStatus.PROCESSED
    assert len(replies_to()) == 1


def test_a_poison_stop_is_still_obeyed(ctx, post_webhook, monkeypatch):
    make_contact(PHONE)
    real = engine.handle_message

    def handle(contact, message):
        if message.body == "STOP":
            violate_a_constraint(contact.id)
        return real(contact, message)

    monkeypatch.setattr(engine, "handle_message", handle)
    assert post_webhook(inbound_form(PHONE, "STOP")).status_code == 200
    run_queue()
    stop = inbound("STOP")
    assert stop.status == MessageStatus.FAILED
    contact = db.session.scalar(sa.select(Contact).where(Contact.phone == PHONE))
    assert contact.consent == Consent.OPTED_OUT  # invariant 4, whatever broke
    assert replies_to() == []


def test_a_backend_start_that_keeps_failing_is_ended_failed(ctx, client, auth, post_webhook, monkeypatch):
    make_contact(PHONE)
    real = engine.start_flow

    def start_flow(contact, *args, **kwargs):
        violate_a_constraint(contact.id)
        return real(contact, *args, **kwargs)

    monkeypatch.setattr(engine, "start_flow", start_flow)
    response = client.post("/notify", json={"to": PHONE, "flow": "feedback"}, headers=auth)
    assert response.status_code == 202
    run_queue()
    db.session.expire_all()
    conversation = db.session.get(Conversation, response.get_json()["id"])
    assert conversation.status == ConversationStatus.FAILED
    assert conversation.attempts == engine.MAX_TURN_ATTEMPTS
    assert "IntegrityError" in conversation.error and conversation.ended_at is not None
    assert outbox.sweep(utcnow() + timedelta(hours=1))["conversations"] == 0

    monkeypatch.setattr(engine, "start_flow", real)
    assert post_webhook(inbound_form(PHONE, "HELP")).status_code == 200
    run_queue()
    assert inbound("HELP").status == MessageStatus.PROCESSED  # the contact is not stuck


def test_a_transient_error_leaves_a_start_starting_and_uncounted(ctx, client, auth, monkeypatch):
    make_contact(PHONE)
    errors = ["lost"] * (engine.MAX_TURN_ATTEMPTS + 1) + ["integrity"] * engine.MAX_TURN_ATTEMPTS
    real = engine.start_flow

    def start_flow(contact, *args, **kwargs):
        if errors.pop(0) == "lost":
            raise OperationalError("INSERT INTO messages", {}, Exception("server closed the connection"))
        violate_a_constraint(contact.id)
        return real(contact, *args, **kwargs)

    monkeypatch.setattr(engine, "start_flow", start_flow)
    response = client.post("/notify", json={"to": PHONE, "flow": "feedback"}, headers=auth)
    huey.flush()
    conversation_id = response.get_json()["id"]
    for _ in range(engine.MAX_TURN_ATTEMPTS + 1):
        with pytest.raises(OperationalError):
            engine.start_conversation(conversation_id)
    db.session.expire_all()
    conversation = db.session.get(Conversation, conversation_id)
    assert (conversation.status, conversation.attempts) == (ConversationStatus.STARTING, 0)
    for _ in range(engine.MAX_TURN_ATTEMPTS - 1):
        with pytest.raises(IntegrityError):
            engine.start_conversation(conversation_id)
    engine.start_conversation(conversation_id)  # the last one gives up instead of raising
    db.session.expire_all()
    conversation = db.session.get(Conversation, conversation_id)
    assert (conversation.status, conversation.attempts) == (ConversationStatus.FAILED, engine.MAX_TURN_ATTEMPTS)


def _queued() -> list[tuple[str, str]]:
    tasks = []
    while (task := huey.dequeue()) is not None:
        tasks.append((task.name.rsplit(".", 1)[-1], task.args[0]))
    return sorted(tasks)


def test_the_sweep_holds_off_inbound_rows_and_starting_conversations(ctx, client, auth, post_webhook):
    make_contact(PHONE)
    assert post_webhook(inbound_form(PHONE, "hello")).status_code == 200
    response = client.post("/notify", json={"to": PHONE, "flow": "feedback"}, headers=auth)
    assert response.status_code == 202
    huey.flush()  # the queue lost both
    message_id, conversation_id = inbound("hello").id, response.get_json()["id"]
    expected = sorted([("process_inbound", message_id), ("start_conversation", conversation_id)])

    start = utcnow()
    assert outbox.sweep(start)["inbound"] == 0  # too young: its own task is still on the queue
    first = start + outbox.STALE_AFTER + timedelta(seconds=1)
    counts = outbox.sweep(first)
    assert (counts["inbound"], counts["conversations"]) == (1, 1)
    assert _queued() == expected
    # A backlog: they are still waiting on the queue; the next sweeps leave them alone...
    for later in (timedelta(minutes=1), outbox.REENQUEUE_AFTER - timedelta(seconds=1)):
        counts = outbox.sweep(first + later)
        assert (counts["inbound"], counts["conversations"]) == (0, 0)
    assert _queued() == []
    # ...until the hold-off is over (the queue really lost them).
    counts = outbox.sweep(first + outbox.REENQUEUE_AFTER)
    assert (counts["inbound"], counts["conversations"]) == (1, 1)
    assert _queued() == expected


def test_a_timeout_failing_on_the_database_does_not_hold_the_other_timeouts_back(ctx, client, auth, monkeypatch):
    """The expiry run goes oldest first: a timeout that fails on an IntegrityError every time would
    be first again on every run, and no later conversation would ever time out."""
    first, second = make_contact(PHONE), make_contact("+15557654321")
    for phone in (PHONE, "+15557654321"):
        assert client.post("/notify", headers=auth, json={
            "to": phone, "flow": "appointment", "variables": {"date": "Monday", "time": "08:00"}}).status_code == 202
        run_queue()
    real = engine.apply_step

    def apply_step(contact, conversation, *args, **kwargs):
        if contact.id == first.id:
            violate_a_constraint(contact.id)
        return real(contact, conversation, *args, **kwargs)

    monkeypatch.setattr(engine, "apply_step", apply_step)
    assert engine.expire_conversations(now=utcnow() + timedelta(days=2)) == 2
    db.session.expire_all()
    ended = {c.contact_id: c for c in db.session.scalars(sa.select(Conversation))}
    assert ended[first.id].status == ConversationStatus.EXPIRED
    assert "IntegrityError" in ended[first.id].error
    assert ended[second.id].status == ConversationStatus.EXPIRED and ended[second.id].error is None
    assert ended[second.id].outcome["answer"] == "no_response"
