"""The web's hot path (issue 17): statements per request, and what the fewer statements must keep.

The inbound webhook, a status callback and /notify to a number write in one statement on
PostgreSQL (CTEs), more on SQLite (no data-modifying CTE), and commit once. Counted with a
listener on the engine, never timed (the CPU figures are in bench/THROUGHPUT.md). The rest checks
the invariants those single statements now carry: a repeated MessageSid changes nothing, a late
message never moves the window back, an empty profile field keeps the stored one, the refusals
still refuse, a callback's message.status event is the one events.message_status writes, and
concurrent callbacks of one message report each move once, in rank order.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import random
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.conversations.inbound import store_inbound
from bot.delivery import events
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Contact, Event, IdempotencyKey, Message, StatusEvent
from bot.vocabulary import RANK, MessageStatus
from tests.conftest import (AUTH_TOKEN, PUBLIC_BASE, WEBHOOK_URL, inbound_form, make_contact, sign,
                            status_form)

PHONE = "+15551234567"


@pytest.fixture
def statements(app) -> Iterator[dict[str, int]]:
    """Statements and commits on the app's engine while the test runs."""
    seen = {"statements": 0, "commits": 0}

    def statement(*_args) -> None:
        seen["statements"] += 1

    def commit(*_args) -> None:
        seen["commits"] += 1

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", statement)
    sa.event.listen(engine, "commit", commit)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", statement)
    sa.event.remove(engine, "commit", commit)


def postgresql(app) -> bool:
    with app.app_context():
        return db.engine.dialect.name == "postgresql"


def reset(seen: dict[str, int]) -> None:
    seen.update(statements=0, commits=0)


@pytest.mark.parametrize("known", [True, False], ids=["known contact", "new contact"])
def test_an_inbound_message_is_one_statement_and_one_commit(app, post_webhook, statements, known):
    if known:
        with app.app_context():
            make_contact(PHONE)
    reset(statements)
    response = post_webhook(inbound_form(PHONE))
    assert response.status_code == 200
    assert statements == {"statements": 1 if postgresql(app) else 2, "commits": 1}
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1
    assert len(huey) == 1  # its turn, enqueued after the commit


@pytest.mark.parametrize("key", [None, "order-1"], ids=["no key", "Idempotency-Key"])
def test_a_message_to_a_number_is_one_statement_and_one_commit(app, client, auth, statements, key):
    with app.app_context():
        make_contact(PHONE)
    reset(statements)
    headers = {**auth, **({"Idempotency-Key": key} if key else {})}
    response = client.post("/notify", json={"to": PHONE, "body": "Your order shipped"}, headers=headers)
    assert response.status_code == 202, response.get_json()
    # PostgreSQL: the whole write is one statement (a key adds its lookup); SQLite: the contact's
    # facts, then the row (and the key).
    expected = (1 if postgresql(app) else 2) + (1 if key and not postgresql(app) else 0) + (1 if key else 0)
    assert statements == {"statements": expected, "commits": 1}
    with app.app_context():
        message = db.session.get(Message, response.get_json()["id"])
        assert message.status == "pending" and message.contact.phone == PHONE
        assert message.idempotency_key == key
        if key:
            assert db.session.get(IdempotencyKey, key).target_id == message.id


def test_a_message_to_a_user_reads_the_user_once(app, client, auth, statements):
    """By user id: the user and a waiting STOP in one statement, then the row."""
    response = client.put("/users/u-1", json={"phone": PHONE}, headers=auth)
    assert response.status_code in (200, 201), response.get_json()
    with app.app_context():
        db.session.execute(sa.update(Contact).where(Contact.user_id == "u-1").values(last_inbound_at=utcnow()))
        db.session.commit()
    reset(statements)
    response = client.post("/notify", json={"user_id": "u-1", "body": "Your order shipped"}, headers=auth)
    assert response.status_code == 202, response.get_json()
    assert statements == {"statements": 2, "commits": 1}


def test_the_answer_of_a_new_message_is_what_was_stored(app, client, auth):
    """The 202 is built from the values written, not read back: it must say what GET says."""
    with app.app_context():
        make_contact(PHONE)
    accepted = client.post("/notify", json={"to": PHONE, "body": "hi", "metadata": {"order": 7}}, headers=auth)
    assert accepted.status_code == 202
    stored = client.get(accepted.headers["Location"], headers=auth).get_json()
    body = accepted.get_json()
    for field in ("id", "status", "channel", "user_id", "to", "created_at"):
        assert body[field] == stored[field], field
    assert stored["metadata"] == {"order": 7} and stored["body"] == "hi"


def test_a_repeated_sid_changes_nothing(app, post_webhook):
    """Twilio retrying a webhook: one row, one turn enqueued, and the contact as the first left it
    (the repeat's contact update is rolled back with its refused insert)."""
    form = inbound_form(PHONE, ProfileName="Ada")
    assert post_webhook(form).status_code == 200
    with app.app_context():
        first = db.session.scalar(sa.select(Contact.last_inbound_at).where(Contact.phone == PHONE))
    huey.flush()
    repeat = {**form, "ProfileName": "Someone Else", "WaId": "999"}
    assert post_webhook(repeat).status_code == 200
    with app.app_context():
        contact = db.session.scalar(sa.select(Contact).where(Contact.phone == PHONE))
        assert (contact.profile_name, contact.wa_id, contact.last_inbound_at) == ("Ada", PHONE.lstrip("+"), first)
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1
    assert len(huey) == 0


def test_a_late_message_never_moves_the_window_back(app):
    """One the worker stores after an outage keeps its own time but not the contact's window."""
    with app.app_context():
        make_contact(PHONE, inbound_ago=timedelta(minutes=1))
        latest = db.session.scalar(sa.select(Contact.last_inbound_at))
        message_id = store_inbound(inbound_form(PHONE), received_at=utcnow() - timedelta(hours=2))
        assert message_id is not None
        db.session.expire_all()
        assert db.session.scalar(sa.select(Contact.last_inbound_at)) == latest
        assert db.session.get(Message, message_id).created_at < latest
        newer = store_inbound(inbound_form(PHONE))
        db.session.expire_all()
        assert db.session.scalar(sa.select(Contact.last_inbound_at)) == db.session.get(Message, newer).created_at


def test_empty_profile_fields_keep_the_stored_ones(app, post_webhook):
    assert post_webhook(inbound_form(PHONE, ProfileName="Ada")).status_code == 200
    assert post_webhook(inbound_form(PHONE, ProfileName="", WaId="")).status_code == 200
    with app.app_context():
        contact = db.session.scalar(sa.select(Contact))
        assert (contact.profile_name, contact.wa_id) == ("Ada", PHONE.lstrip("+"))
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 2


def test_the_refusals_still_refuse_in_one_statement(app, client, auth, post_webhook):
    """Outside the window (a new number is kept all the same), opted out, a STOP not yet handled."""
    response = client.post("/notify", json={"to": PHONE, "body": "hi"}, headers=auth)
    assert response.status_code == 422
    with app.app_context():
        assert db.session.scalar(sa.select(Contact.phone)) == PHONE
    with app.app_context():
        make_contact("+15550000001", consent="opted_out")
    assert client.post("/notify", json={"to": "+15550000001", "body": "hi"}, headers=auth).status_code == 409
    assert post_webhook(inbound_form("+15550000002", body="STOP")).status_code == 200  # the engine has not run
    response = client.post("/notify", json={"to": "+15550000002", "body": "hi"}, headers=auth)
    assert response.status_code == 409
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)
                                 .where(Message.direction == "outbound")) == 0
    # A template may go outside the window.
    response = client.post("/notify", json={"to": PHONE, "template": "order_update", "variables": {"1": "7"}},
                           headers=auth)
    assert response.status_code == 202, response.get_json()


def outbound_message(app, sid: str, phone: str = PHONE, **fields) -> str:
    """An accepted outbound notification with Twilio's SID, to a contact made here; its id."""
    with app.app_context():
        contact = db.session.scalar(sa.select(Contact).where(Contact.phone == phone)) or make_contact(phone)
        message = Message(direction="outbound", contact_id=contact.id, body="Your order shipped", status="accepted",
                          status_rank=RANK[MessageStatus.ACCEPTED], twilio_sid=sid, **fields)
        db.session.add(message)
        db.session.commit()
        return message.id


@pytest.mark.parametrize("status, code", [("delivered", None), ("undelivered", 30003)])
def test_a_status_callback_is_one_statement_and_one_commit(app, post_webhook, statements, status, code):
    """PostgreSQL: the status event, the raise and the message.status event in one statement
    (a final failure no other channel can get around needs nothing more); SQLite: the event
    (committed), the raise, the error, the read for message.status and its insert."""
    sid = "SM" + "a" * 32
    message_id = outbound_message(app, sid)
    reset(statements)
    assert post_webhook(status_form(sid, status, error_code=code)).status_code == 200
    if postgresql(app):
        assert statements == {"statements": 1, "commits": 1}
    else:
        assert statements == {"statements": 4 + (1 if code else 0), "commits": 2}
    with app.app_context():
        row = db.session.get(Message, message_id)
        assert (row.status, row.error_code) == (status, code)
        assert db.session.scalar(sa.select(Event.data["status"].as_string())) == status
    reset(statements)
    assert post_webhook(status_form(sid, status, error_code=code)).status_code == 200  # a repeat
    assert statements == {"statements": 1, "commits": 0}
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(StatusEvent)) == 1
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Event)) == 1


def test_a_callback_for_an_unknown_sid_is_kept_and_looked_for_again(app, post_webhook, statements):
    """As before the single statement: kept unlinked, and the SID looked for once more after the
    commit (the sender may have committed it meanwhile)."""
    reset(statements)
    assert post_webhook(status_form("SM" + "b" * 32, "delivered")).status_code == 200
    assert statements == {"statements": 2, "commits": 1}
    with app.app_context():
        assert db.session.scalar(sa.select(StatusEvent.message_id)) is None
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Event)) == 0


def test_a_callbacks_message_status_event_is_the_one_events_writes(app, post_webhook):
    """Same fields, same order, same values as events.message_status; pushed (and its delivery
    enqueued after the commit) only with EVENTS_WEBHOOK_URL; an error kept when the status
    cannot move reports nothing."""
    sid = "SM" + "c" * 32
    message_id = outbound_message(app, sid, backend_metadata={"order": 7, "note": "café"})
    with app.app_context():
        db.session.execute(sa.update(Contact).values(user_id="u-7"))
        db.session.commit()
    app.config["EVENTS_WEBHOOK_URL"] = "http://127.0.0.1:9/events"
    huey.flush()
    assert post_webhook(status_form(sid, "delivered")).status_code == 200
    assert len(huey) == 1  # deliver_event, after the commit
    app.config["EVENTS_WEBHOOK_URL"] = None
    huey.flush()
    assert post_webhook(status_form(sid, "read")).status_code == 200
    assert post_webhook(status_form(sid, "failed", error_code=63016)).status_code == 200  # kept, not reported
    assert len(huey) == 0
    with app.app_context():
        written = db.session.scalars(sa.select(Event).order_by(Event.seq)).all()
        assert [(e.data["status"], e.status, e.next_attempt_at is not None) for e in written] == [
            ("delivered", "pending", True), ("read", "stored", False)]
        message = db.session.get(Message, message_id)
        assert (message.status, message.error_code) == ("read", 63016)
        for event, status in zip(written, ["delivered", "read"]):
            with db.session.begin_nested():
                expected = events.message_status(message, PHONE, status, None, None, "u-7")
                db.session.rollback()
            assert list(event.data.items()) == list(expected.data.items())
            assert (event.type, event.contact_id, event.message_id, event.conversation_id, event.attempts) == (
                "message.status", message.contact_id, message_id, None, 0)
        if postgresql(app):
            assert all(event.txid > 0 for event in written)


def test_concurrent_callbacks_report_each_move_once_in_rank_order(app):
    """Callbacks of the same messages posted at once from several threads, each twice: every
    message ends at `read`, and its message.status events, in insert order, rise strictly in
    rank (a move is reported only when the rank really moved from the latest committed one)."""
    statuses = ["queued", "sending", "sent", "delivered", "read"]
    sids = ["SM%032x" % (0xD0 + i) for i in range(12)]
    for i, sid in enumerate(sids):
        outbound_message(app, sid, phone=f"+1555000{i:04d}")
    posts = [(sid, status) for sid in sids for status in statuses] * 2
    random.Random(17).shuffle(posts)
    answers: list[int] = []

    def post_some(share: list[tuple[str, str]]) -> None:
        client = app.test_client()
        for sid, status in share:
            form = status_form(sid, status)
            answers.append(client.post("/twilio/webhook", data=form, base_url=PUBLIC_BASE,
                                       headers={"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)}).status_code)

    threads = [threading.Thread(target=post_some, args=(posts[k::6],)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * len(posts)
    with app.app_context():
        assert set(db.session.scalars(sa.select(Message.status))) == {"read"}
        reported: dict[str, list[int]] = {}
        for event in db.session.scalars(sa.select(Event).where(Event.type == "message.status").order_by(Event.seq)):
            reported.setdefault(event.data["twilio_sid"], []).append(RANK[MessageStatus(event.data["status"])])
        assert set(reported) == set(sids)
        for sid, ranks in reported.items():
            assert ranks == sorted(set(ranks)) and ranks[-1] == RANK[MessageStatus.READ], (sid, ranks)


@pytest.mark.parametrize("signed_over", [
    WEBHOOK_URL, "https://bot.example.test:443/twilio/webhook", "https://bot.example.test:8443/twilio/webhook",
    "http://bot.example.test/twilio/webhook", WEBHOOK_URL + "?x=1"])
def test_the_signature_check_accepts_exactly_what_the_sdk_accepts(app, client, signed_over):
    """One HMAC for a genuine request (the URL as configured first), the same verdict as the
    SDK's RequestValidator.validate, which tries the URL with and without its port."""
    from twilio.request_validator import RequestValidator

    form = inbound_form(PHONE)
    signature = sign(AUTH_TOKEN, signed_over, form)
    sdk = RequestValidator(AUTH_TOKEN).validate(WEBHOOK_URL, form, signature)
    response = client.post("/twilio/webhook", data=form, headers={"X-Twilio-Signature": signature},
                           base_url=PUBLIC_BASE)
    assert response.status_code == (200 if sdk else 403)
    assert sdk == (signed_over in (WEBHOOK_URL, "https://bot.example.test:443/twilio/webhook"))


def test_the_keywords_are_normalised_once_and_again_when_their_setting_changes(app):
    from bot.conversations.consent import Keywords

    with app.app_context():
        first = Keywords.from_config()
        assert Keywords.from_config() is first
        app.config["OPT_OUT_KEYWORDS"] = [*app.config["OPT_OUT_KEYWORDS"], "BASTA"]
        changed = Keywords.from_config()
        assert changed is not first and "basta" in changed.opt_out and "basta" not in first.opt_out


@pytest.mark.parametrize("idle_ping", [True, False], ids=["pinged after idling", "never pinged"])
def test_a_pooled_connection_killed_while_idle_is_replaced_before_a_request_uses_it(app, client, auth, monkeypatch,
                                                                                   idle_ping):
    """What pool_pre_ping did, without its round trip per request: a connection that sat idle is
    pinged, and a dead one replaced, so the request after a database restart succeeds. Without
    the ping that request is the one that finds the dead connection (a 503), and the next one
    succeeds (the pool is invalidated)."""
    from bot import database

    if not postgresql(app):
        pytest.skip("PostgreSQL only: a server-side connection is killed")
    import psycopg

    with app.app_context():
        make_contact(PHONE)
    notify = {"to": PHONE, "body": "Your order shipped"}
    assert client.post("/notify", json=notify, headers=auth).status_code == 202  # a connection in the pool
    with app.app_context():
        url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as killer:  # outside the pool: what a restart does to it
        killed = killer.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        assert killed.fetchone()[0] >= 1
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0 if idle_ping else 3600.0)
    first = client.post("/notify", json=notify, headers=auth)
    assert first.status_code == (202 if idle_ping else 503), first.get_json()
    assert client.post("/notify", json=notify, headers=auth).status_code == 202


#: Bodies whose parsing has edge cases: escapes, '+', blanks, a repeated key, a key alone, broken
#: and non-UTF-8 escapes.
ODD_BODIES = [
    "Body=caf%C3%A9+%2B+%F0%9F%98%80&ProfileName=&Empty=&MediaUrl0=https%3A%2F%2Fx.test%2Fa%3Fb%3Dc",
    "Body=one&Body=two&Alone&&=v&k=%zz&bad=%ff%fe&plus=a+b%2Bc",
    b"Body=\xff\xfe&From=x",  # not UTF-8 at all: Werkzeug's parser gives an empty form
]


@pytest.mark.parametrize("body", ODD_BODIES)
def test_the_form_parsed_once_is_the_form_werkzeug_parses(app, body):
    """The webhook parses its urlencoded form itself (bot/http/auth.py::twilio_form, half the CPU):
    the same fields and values as `request.form`, so the same signature."""
    from flask import request
    from twilio.request_validator import RequestValidator

    from bot.http.auth import twilio_form

    with app.test_request_context("/twilio/webhook", method="POST", data=body,
                                  content_type="application/x-www-form-urlencoded; charset=utf-8"):
        ours = twilio_form()
        assert twilio_form() is ours  # parsed once per request
        theirs = request.form
        assert list(ours.items(multi=True)) == list(theirs.items(multi=True))
        validator = RequestValidator(AUTH_TOKEN)
        assert validator.compute_signature(WEBHOOK_URL, ours) == validator.compute_signature(WEBHOOK_URL, theirs)


def test_a_body_that_is_not_utf8_is_refused_as_unsigned_not_a_500(app, client):
    response = client.post("/twilio/webhook", data=b"Body=\xff\xfe&From=x", headers={"X-Twilio-Signature": "x"},
                           content_type="application/x-www-form-urlencoded", base_url=PUBLIC_BASE)
    assert response.status_code == 403, response.get_data(as_text=True)


def test_a_repeated_field_is_signed_as_twilio_signs_it(app, client):
    """A field given twice is signed with both values (the SDK's rule over a multi-dict: each key
    once, sorted, then each of its values, sorted): the parsed form keeps both, so the genuine
    request passes and one without the second value does not."""
    from urllib.parse import urlencode

    pairs = [*inbound_form(PHONE).items(), ("MediaContentType0", "b"), ("MediaContentType0", "a")]
    signed = WEBHOOK_URL + "".join(key + value for key, value in sorted(pairs))
    signature = base64.b64encode(hmac.new(AUTH_TOKEN.encode(), signed.encode(), hashlib.sha1).digest()).decode()
    for body, expected in ((urlencode(pairs), 200), (urlencode(pairs[:-1]), 403)):
        response = client.post("/twilio/webhook", data=body, content_type="application/x-www-form-urlencoded",
                               headers={"X-Twilio-Signature": signature}, base_url=PUBLIC_BASE)
        assert response.status_code == expected, response.get_data(as_text=True)


def test_a_webhook_posted_as_multipart_is_still_verified_and_stored(app, client):
    """Only an urlencoded body takes the short parse; any other form goes through Werkzeug's."""
    form = inbound_form(PHONE)
    headers = {"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)}
    response = client.post("/twilio/webhook", data=form, headers=headers, content_type="multipart/form-data",
                           base_url=PUBLIC_BASE)
    assert response.status_code == 200, response.get_data(as_text=True)
    refused = client.post("/twilio/webhook", data={**form, "Body": "changed"}, headers=headers,
                          content_type="multipart/form-data", base_url=PUBLIC_BASE)
    assert refused.status_code == 403
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)
                                 .where(Message.twilio_sid == form["MessageSid"])) == 1


def test_an_enqueue_on_the_held_redis_connection_is_what_huey_reads_and_survives_its_loss(app):
    """The Redis queue's ZADD on a connection each thread keeps (bot/delivery/queue.py): the
    consumer reads the same tasks in the same lanes, and a connection Redis dropped is replaced
    for that very enqueue (redis-py's client with its reconnect), so nothing waits for the sweep."""
    from bot.delivery import outbox

    if not app.config.get("REDIS_URL"):
        pytest.skip("Redis only: the SQLite queue has no connection to hold")
    import redis

    with app.app_context():
        assert outbox.enqueue(outbox.Work.SEND, "bulk-1", outbox.Priority.BULK)
        assert outbox.enqueue(outbox.Work.INBOUND, "turn-1", outbox.Priority.CONVERSATION)
        # What a Redis restart does to every client: the held socket is dead now.
        killer = redis.Redis.from_url(app.config["REDIS_URL"])
        assert killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
        assert outbox.enqueue(outbox.Work.INBOUND, "turn-2", outbox.Priority.CONVERSATION)
        assert outbox.enqueue(outbox.Work.SEND, "bulk-2", outbox.Priority.BULK)  # on a new held connection
        got = []
        while (task := huey.dequeue()) is not None:
            got.append((task.name, task.args, task.priority))
    assert got == [("process_inbound", ("turn-1",), 10), ("process_inbound", ("turn-2",), 10),
                   ("send_message", ("bulk-1",), 0), ("send_message", ("bulk-2",), 0)]


def test_threads_that_enqueue_and_end_give_their_held_connection_back(app):
    """Each thread that enqueues holds one Redis connection; when it ends, the connection goes
    back to the pool. The bulk lane runs every pump turn on a thread of its own, so without that
    the pool's 100 connections ran out after about a hundred turns (MaxConnectionsError)."""
    from bot.delivery import outbox

    if not app.config.get("REDIS_URL"):
        pytest.skip("Redis only: the SQLite queue has no connection to hold")
    pool = huey.storage.conn.connection_pool
    failures: list[BaseException] = []

    def enqueue_once(number: int) -> None:
        try:
            with app.app_context():
                assert outbox.enqueue(outbox.Work.SEND, f"short-lived-{number}", outbox.Priority.BULK)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    for number in range(pool.max_connections + 20):
        thread = threading.Thread(target=enqueue_once, args=(number,))
        thread.start()
        thread.join()
    assert failures == []
    with app.app_context():
        got = 0
        while huey.dequeue() is not None:
            got += 1
    assert got == pool.max_connections + 20
    assert len(pool._in_use_connections) <= 2  # this thread's, and none left by the dead threads
