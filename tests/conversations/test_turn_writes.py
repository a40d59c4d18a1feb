"""A turn's writes (bot/conversations/writes.py): one statement on PostgreSQL, one per table on SQLite.

The suite runs on SQLite by default and on PostgreSQL with TEST_DATABASE_URL, so each database's
path runs everywhere the suite runs; on PostgreSQL the per-table path runs too (forced), and the
two must write the same rows, field for field, and the events in the same order
(docs/ARCHITECTURE.md, "Inbound" and invariant 12).
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from bot.conversations import engine, writes
from bot.extensions import db
from bot.models import Contact, Conversation, Event, Message
from tests.conftest import inbound_form, make_contact, run_queue


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield


def postgresql() -> bool:
    return db.engine.dialect.name == "postgresql"


@pytest.fixture
def statements(ctx) -> Iterator[list[str]]:
    """Every statement sent to the database while the test runs."""
    seen: list[str] = []

    def record(conn, cursor, statement, *rest) -> None:  # noqa: ANN001 - the event's signature
        seen.append(" ".join(statement.split()))

    sa.event.listen(db.engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(db.engine, "before_cursor_execute", record)


def waiting_inbound(phone: str, text: str) -> str:
    """An inbound message stored as the webhook stores it, not yet through the engine."""
    contact = make_contact(phone)
    message = Message(direction="inbound", kind="inbound", contact_id=contact.id, body=text, status="received",
                      status_rank=0, twilio_sid="SM" + phone[1:].rjust(32, "0"), payload=inbound_form(phone, text))
    db.session.add(message)
    db.session.commit()
    return message.id


def test_a_turn_writes_in_one_statement_on_postgresql_and_one_per_table_elsewhere(statements):
    """A "feedback" turn: the inbound row's UPDATE, the conversation, the reply, its two events."""
    message_id = waiting_inbound("+15550001111", "feedback")
    statements.clear()
    engine.process_inbound(message_id)
    writes_ = [s for s in statements if s.startswith(("INSERT", "UPDATE messages", "WITH"))]
    if postgresql():
        # The lock, the read, the writes: three statements, the writes one CTE.
        assert len(statements) == 3, statements
        [one] = writes_
        assert one.startswith("WITH ") and one.count("INSERT INTO") == 3 and "UPDATE messages" in one
    else:
        # The inbound row's UPDATE, then an INSERT per table (SQLite's driver returns the events'
        # keys in order only one row at a time: one INSERT per event).
        assert [s.split(" (")[0] for s in writes_] == [
            "UPDATE messages SET status=?, updated_at=? WHERE messages.id = ?", "INSERT INTO conversations",
            "INSERT INTO messages", "INSERT INTO events", "INSERT INTO events"], writes_
        assert not any(s.startswith("WITH") for s in statements)
    db.session.expire_all()
    assert db.session.get(Message, message_id).status == "processed"
    [conversation] = db.session.scalars(sa.select(Conversation)).all()
    [reply] = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")).all()
    assert (conversation.flow, conversation.status, reply.conversation_id) == ("feedback", "active", conversation.id)
    events = db.session.scalars(sa.select(Event).order_by(Event.txid, Event.seq)).all()
    assert [e.type for e in events] == ["conversation.started", "message.received"]
    assert events[0].txid == events[1].txid and events[0].seq < events[1].seq


SCRIPT = ["feedback", "4", "Great service", "hello", "feedback", "STOP", "hi"]


def _snapshot(phone: str) -> dict[str, Any]:
    """What a contact's script left in the database, with its own ids and times left out."""
    db.session.expire_all()
    contact = db.session.scalar(sa.select(Contact).where(Contact.phone == phone))
    conversations = db.session.scalars(sa.select(Conversation).where(Conversation.contact_id == contact.id)
                                       .order_by(Conversation.started_at)).all()
    index = {c.id: i for i, c in enumerate(conversations)}
    messages = db.session.scalars(sa.select(Message).where(Message.contact_id == contact.id)
                                  .order_by(Message.created_at, Message.id)).all()
    message_index = {m.id: i for i, m in enumerate(messages)}
    events = db.session.scalars(sa.select(Event).where(Event.contact_id == contact.id)
                                .order_by(Event.txid, Event.seq)).all()
    skip = {"id", "contact_id", "conversation_id", "twilio_sid", "payload", "created_at", "updated_at",
            "started_at", "ended_at", "expires_at", "next_attempt_at", "claimed_until", "claim_token", "sent_at",
            "delivered_at", "read_at", "attempt_started_at", "contact", "txid", "seq", "message_id", "data_at", "at", "phone", "to", "from"}

    def fields(row: Any) -> dict[str, Any]:
        return {c.key: getattr(row, c.key) for c in sa.inspect(type(row)).column_attrs if c.key not in skip}

    def event_data(data: Any) -> Any:
        if isinstance(data, dict):
            return {k: (index.get(v, message_index.get(v, "<id>")) if k.endswith("id") else event_data(v))
                    for k, v in data.items() if k not in skip and not k.endswith("_at")}
        if isinstance(data, list):
            return [event_data(v) for v in data]
        return data

    return {"consent": contact.consent,
            "conversations": [fields(c) for c in conversations],
            "messages": [{**fields(m), "conversation": index.get(m.conversation_id)} for m in messages],
            "events": [(e.type, index.get(e.conversation_id), message_index.get(e.message_id), event_data(e.data),
                        e.status) for e in events]}


def _run_script(post_webhook, phone: str) -> dict[str, Any]:
    for text in SCRIPT:
        assert post_webhook(inbound_form(phone, text)).status_code == 200
        run_queue()
    return _snapshot(phone)


def test_both_ways_of_writing_a_turn_store_the_same_rows(ctx, post_webhook, monkeypatch):
    """A conversation started, answered and completed, a greeting, another started and cut by a
    STOP (its ledger row: the ORM's flush), silence after it. On PostgreSQL the script runs once
    in one statement per turn and once forced through the per-table statements, and both leave
    the same rows; on SQLite (one way only) it must leave what the conversation says."""
    one_way = _run_script(post_webhook, "+15550002222")
    assert [m["template"] for m in one_way["messages"] if m["direction"] == "outbound"] == [
        "feedback/ask_rating", "feedback/ask_comment", "feedback/thanks", "welcome/ask_consent",
        "feedback/ask_rating", "subscription/opted_out"]
    assert [(c["flow"], c["status"]) for c in one_way["conversations"]] == [
        ("feedback", "completed"), ("welcome", "completed"), ("feedback", "cancelled")]
    assert one_way["conversations"][0]["outcome"]["rating"] == 4
    # A turn's events in the order they were emitted (the reply's message.status is the sender's).
    assert [e[0] for e in one_way["events"]][:7] == [
        "conversation.started", "message.received", "message.status", "message.received", "message.status",
        "conversation.completed", "message.received"]
    if not postgresql():
        return
    monkeypatch.setattr(writes, "one_statement", lambda dialect: False)
    other_way = _run_script(post_webhook, "+15550003333")
    assert other_way == one_way
