"""Outbound delivery through the queue to the Twilio simulator (real SDK, real HTTP)."""
from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from huey import signals

from bot.channels.whatsapp.channel import twilio_params
from bot.channels.whatsapp.client import get_client
from bot.channels.whatsapp.lookup import match_accepted_send, recent_sends
from bot.delivery import claims, outbox, sender
from bot.channels.whatsapp.errors import OPTED_OUT_CODE, OUTSIDE_WINDOW_CODE
from bot.clock import utcnow
from bot.extensions import db
from bot.models import Message
from bot.delivery.queue import huey
from bot.delivery.tasks import SEND_RETRIES, send_message
from tests.conftest import CONTENT_SIDS, SENDER, WEBHOOK_URL, make_contact, run_queue


def notify(client, auth, **payload):
    response = client.post("/notify", json=payload, headers=auth)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def message(message_id: str) -> Message:
    db.session.expire_all()
    return db.session.get(Message, message_id)


def test_notify_is_sent_with_twilio_wire_format(app, client, auth, twilio):
    with app.app_context():
        make_contact("+15551234567")
    message_id = notify(client, auth, to="whatsapp:+1 555 123 4567", body="Your order shipped")
    assert run_queue() == 1

    [sent] = twilio.messages
    assert sent["form"]["To"] in ("whatsapp:+15551234567", ["whatsapp:+15551234567"])
    form = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in sent["form"].items()}
    assert form["From"] == SENDER
    assert form["Body"] == "Your order shipped"
    assert form["StatusCallback"] == WEBHOOK_URL
    with app.app_context():
        row = message(message_id)
        assert row.twilio_sid == sent["sid"]
        assert row.status == "queued"
        assert row.attempts == 1
        assert row.claimed_until is None


def test_template_goes_out_as_content_sid_and_variables(app, client, auth, twilio):
    with app.app_context():
        make_contact("+15551234567", inbound_ago=None)  # never wrote: only a template may go
    notify(client, auth, to="+15551234567", template="order_update", variables={"1": "Ada", "2": 42})
    run_queue()
    [sent] = twilio.messages
    form = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in sent["form"].items()}
    assert form["ContentSid"] == CONTENT_SIDS["order_update"]
    assert json.loads(form["ContentVariables"]) == {"1": "Ada", "2": "42"}
    assert "Body" not in form


def test_row_is_committed_before_its_task_is_enqueued(app, client, auth, database_url):
    """Invariant 1: at the moment of enqueue, another connection already sees the pending row."""
    with app.app_context():
        make_contact()
    seen: list[tuple[str, str] | None] = []
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))

    @huey.signal(signals.SIGNAL_ENQUEUED)
    def look(signal, task):
        with engine.connect() as conn:
            seen.append(conn.execute(sa.text("SELECT id, status FROM messages")).first())

    try:
        message_id = notify(client, auth, to="+15551234567", body="hi")
    finally:
        huey.disconnect_signal(look)
        engine.dispose()
    assert seen and tuple(seen[0]) == (message_id, "pending")


def test_dead_queue_delays_but_never_drops(app, client, auth, twilio, monkeypatch):
    """Invariant 1: enqueue fails (broker down), /notify still answers 202, the sweep sends later."""
    with app.app_context():
        make_contact()

    def broker_down(*args, **kwargs):
        raise ConnectionError("queue unavailable")

    monkeypatch.setattr(huey.storage, "enqueue", broker_down)
    message_id = notify(client, auth, to="+15551234567", body="hi")
    monkeypatch.undo()
    assert run_queue() == 0 and twilio.messages == []

    with app.app_context():
        assert outbox.sweep()["outbound"] == 0  # too fresh: it may still be on its way
        counts = outbox.sweep(now=utcnow() + outbox.STALE_AFTER + timedelta(seconds=1))
        assert counts["outbound"] == 1
    run_queue()
    assert len(twilio.messages) == 1
    with app.app_context():
        assert message(message_id).status == "queued"


def test_redelivered_task_does_not_send_twice(app, client, auth, twilio):
    """Invariant 2: the same send task queued three times reaches Twilio once."""
    with app.app_context():
        make_contact()
    message_id = notify(client, auth, to="+15551234567", body="once")
    send_message(message_id)
    send_message(message_id)
    assert run_queue() == 3
    assert len(twilio.messages) == 1
    with app.app_context():
        assert message(message_id).attempts == 1


@pytest.mark.parametrize("lane, rollbacks", [("bulk", 0), ("main", 1)])
def test_a_send_batch_ends_its_read_by_lane(app, client, auth, twilio, monkeypatch, lane, rollbacks):
    """A send batch reads its recipients and gives the connection back before calling Twilio. In
    the bulk process that read ends with COMMIT, which keeps psycopg's prepared statements; the
    worker's own batches end it with a ROLLBACK (bot/delivery/sender.py, send_claimed). What was
    read stays usable either way: the send goes out to its contact."""
    with app.app_context():
        contact_id = make_contact().id
    message_id = notify(client, auth, to="+15551234567", body="one")
    huey.flush()
    monkeypatch.setitem(app.config, "BOT_QUEUE_LANE", lane)
    seen: list[str] = []
    with app.app_context():
        listener = lambda connection: seen.append("rollback")  # noqa: E731
        sa.event.listen(db.engine, "rollback", listener)
        try:
            assert sender.deliver(message_id) == sender.Outcome.SENT
        finally:
            sa.event.remove(db.engine, "rollback", listener)
        assert message(message_id).twilio_sid is not None and message(message_id).contact_id == contact_id
    assert len(seen) == rollbacks
    assert [m["body"] for m in twilio.messages] == ["one"]


def test_concurrent_sends_claim_once(app, client, auth, twilio):
    """Invariant 2: sends racing in threads (several consumers) still make one Twilio call."""
    with app.app_context():
        make_contact()
    message_id = notify(client, auth, to="+15551234567", body="race")
    huey.flush()
    twilio.hang_next(0.3)  # keep the winner inside Twilio while the others try to claim
    outcomes: list[str] = []

    def send() -> None:
        with app.app_context():
            outcomes.append(sender.deliver(message_id).value)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["not_claimed"] * 3 + ["sent"]
    assert len(twilio.messages) == 1


def test_transient_failure_retries_then_sends_once(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    twilio.fail_next(429, 20429, "Too Many Requests", times=2)
    message_id = notify(client, auth, to="+15551234567", body="retry me")
    run_queue()
    assert len(twilio.requests) == 3
    assert len(twilio.messages) == 1
    with app.app_context():
        row = message(message_id)
        assert row.status == "queued" and row.attempts == 3 and row.error_code is None


def test_server_errors_retry_fast_then_back_off_then_fail_with_the_last_code(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    twilio.fail_next(503, 20503, "Service Unavailable", times=100)
    message_id = notify(client, auth, to="+15551234567", body="never")
    run_queue()
    # The task's own retries: quick attempts, then the message waits for the sweep (an outage of
    # a minute must not fail it), its status never back below "dispatching".
    assert len(twilio.requests) == SEND_RETRIES + 1 == sender.FAST_ATTEMPTS
    with app.app_context():
        row = message(message_id)
        # The backend sees why it waits.
        assert (row.status, row.status_rank, row.error_code) == ("retrying", 1, 20503)
        assert row.error_message.startswith(f"attempt {sender.FAST_ATTEMPTS} failed, retrying:")
        first_due = row.next_attempt_at - utcnow()
        assert timedelta(seconds=20) < first_due <= sender.MAX_BACKOFF
        assert outbox.sweep()["outbound"] == 0  # not due yet
    for _ in range(sender.MAX_ATTEMPTS):  # each due time passes: one attempt per sweep
        with app.app_context():
            age_retry(message_id)
            outbox.sweep()
        run_queue()
    assert len(twilio.requests) == sender.MAX_ATTEMPTS
    with app.app_context():
        row = message(message_id)
        assert (row.status, row.error_code, row.attempts) == ("failed", 20503, sender.MAX_ATTEMPTS)
        assert "retrying" not in row.error_message
    twilio.reset()
    with app.app_context():
        age_retry(message_id)
        outbox.sweep()
    run_queue()
    assert twilio.requests == []


def age_retry(message_id: str) -> None:
    """Time passes until the message's next attempt is due (instead of sleeping for it)."""
    past = utcnow() - timedelta(seconds=1)
    db.session.execute(sa.update(Message).where(Message.id == message_id, Message.status == "retrying")
                       .values(next_attempt_at=past, claimed_until=None))
    db.session.commit()


def test_twilio_back_after_an_outage_sends_the_waiting_message_once(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    twilio.fail_next(503, 20503, "Service Unavailable", times=sender.FAST_ATTEMPTS)
    message_id = notify(client, auth, to="+15551234567", body="patience")
    run_queue()
    assert twilio.messages == []
    with app.app_context():
        assert outbox.sweep()["outbound"] == 0  # not due yet
        db.session.execute(sa.update(Message).where(Message.id == message_id)
                           .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert outbox.sweep()["outbound"] == 1
        # Enqueued once: the next sweeps leave it alone while it waits on the queue.
        assert outbox.sweep()["outbound"] == 0
        assert outbox.sweep(now=utcnow() + timedelta(minutes=1))["outbound"] == 0
    run_queue()
    [sent] = twilio.messages
    assert sent["body"] == "patience"
    with app.app_context():
        row = message(message_id)
        assert (row.status, row.attempts, row.error_code) == ("queued", sender.FAST_ATTEMPTS + 1, None)
        assert row.error_message is None  # the outage is over: no stale reason left behind


def test_connection_refused_is_transient(app, client, auth, twilio):
    with app.app_context():
        make_contact()
        app.config["TWILIO_API_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port
        app.extensions["twilio_client"] = None  # built again, from the new URL
    message_id = notify(client, auth, to="+15551234567", body="unreachable")
    run_queue()
    with app.app_context():
        row = message(message_id)
        assert row.status == "retrying" and row.attempts == sender.FAST_ATTEMPTS


def test_an_unexpected_error_fails_the_message_instead_of_holding_it(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    # A lone surrogate cannot be encoded for the HTTP request; /notify refuses it in a body, but
    # rows can come from elsewhere (a flow, an older version): the send must not wedge on it.
    message_id = notify(client, auth, to="+15551234567", body="fine")
    with app.app_context():
        db.session.execute(sa.update(Message).where(Message.id == message_id)
                           .values(media_urls=["https://example.com/\udc80.png"]))
        db.session.commit()
    run_queue()
    with app.app_context():
        row = message(message_id)
        assert row.status == "failed" and row.attempts == 1
        assert "unexpected UnicodeEncodeError" in row.error_message
    run_queue()
    assert twilio.messages == []


def test_slow_answer_that_twilio_accepted_is_not_sent_again(app, client, auth, twilio):
    """A read timeout is ambiguous: Twilio may have taken the message. We look before resending."""
    with app.app_context():
        make_contact()
    twilio.hang_next(2.5)  # the app's SDK timeout is 2 s; the simulator accepts after the hang
    message_id = notify(client, auth, to="+15551234567", body="slow")
    run_queue()
    [accepted] = twilio.messages
    assert len([r for r in twilio.requests if r["method"] == "POST"]) == 1
    with app.app_context():
        row = message(message_id)
        assert (row.twilio_sid, row.attempts, row.status) == (accepted["sid"], 1, "queued")


def test_timeout_without_acceptance_is_retried(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    # Twilio answers the create with an error after the hang: nothing was accepted.
    twilio.hang_next(2.5)
    twilio.fail_next(500, 20500, "Internal Server Error")
    message_id = notify(client, auth, to="+15551234567", body="slow")
    run_queue()
    assert len(twilio.messages) == 1
    with app.app_context():
        row = message(message_id)
        assert row.attempts == 2 and row.status == "queued"


def test_permanent_error_fails_without_retry(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    twilio.fail_next(400, 63024, "Invalid message recipient")
    message_id = notify(client, auth, to="+15551234567", body="nope")
    run_queue()
    assert len(twilio.requests) == 1
    with app.app_context():
        row = message(message_id)
        assert (row.status, row.error_code, row.attempts) == ("failed", 63024, 1)
        assert "Invalid message recipient" in row.error_message


def test_opt_out_after_queueing_is_enforced_at_send_time(app, client, auth, twilio):
    """Invariant 4: consent is checked where messages are sent, not only in /notify."""
    with app.app_context():
        contact = make_contact()
        contact_id = contact.id
    message_id = notify(client, auth, to="+15551234567", body="promo")
    with app.app_context():
        db.session.execute(sa.text("UPDATE contacts SET consent = 'opted_out' WHERE id = :id"), {"id": contact_id})
        db.session.commit()
    run_queue()
    assert twilio.requests == []
    with app.app_context():
        row = message(message_id)
        assert (row.status, row.error_code) == ("failed", OPTED_OUT_CODE)


def test_window_closing_while_queued_refuses_before_twilio(app, client, auth, twilio):
    """Invariant 5: free-form text whose window closed in the queue never reaches Twilio."""
    with app.app_context():
        contact = make_contact(inbound_ago=timedelta(hours=23, minutes=59))
        contact_id = contact.id
    message_id = notify(client, auth, to="+15551234567", body="late")
    with app.app_context():
        db.session.execute(sa.text("UPDATE contacts SET last_inbound_at = :t WHERE id = :id"),
                           {"t": utcnow() - timedelta(hours=25), "id": contact_id})
        db.session.commit()
    run_queue()
    assert twilio.requests == []
    with app.app_context():
        assert message(message_id).error_code == OUTSIDE_WINDOW_CODE


def test_killed_worker_lease_expires_and_sweep_resends(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    message_id = notify(client, auth, to="+15551234567", body="orphaned")
    huey.flush()  # the worker took the task and died
    with app.app_context():
        assert claims.claim(message_id)
        assert outbox.sweep(now=utcnow() + timedelta(seconds=5))["outbound"] == 0  # lease still held
        # Time passes beyond the lease: age the claim instead of sleeping through it.
        db.session.execute(sa.update(Message).values(claimed_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert outbox.sweep()["outbound"] == 1
    run_queue()
    assert len(twilio.messages) == 1


def test_only_one_consumer_takes_each_periodic_turn(app):
    with app.app_context():
        turns = [outbox.take_periodic_turn("sweep_outbox", interval_seconds=50) for _ in range(3)]
    assert turns == [True, False, False]


def test_concurrent_requests_with_one_idempotency_key_create_one_message(app, auth, twilio):
    """Two backends' retries racing: the unique key decides, the loser answers with the winner's id."""
    with app.app_context():
        make_contact()
    answers: list[tuple[int, str]] = []
    start = threading.Barrier(6)

    def post() -> None:
        client = app.test_client()
        start.wait()
        response = client.post("/notify", json={"to": "+15551234567", "body": "once"},
                               headers={**auth, "Idempotency-Key": "race-1"})
        answers.append((response.status_code, response.get_json()["id"]))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 6
    assert {status for status, _ in answers} == {202}
    assert len({message_id for _, message_id in answers}) == 1
    run_queue()
    assert len(twilio.messages) == 1
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1


def test_a_timed_out_template_send_adopts_no_sid_while_another_send_is_in_flight(app, client, auth, twilio):
    """A template's text is Twilio's: the recent message found may be the other send's."""
    with app.app_context():
        contact = make_contact()
        template_id = notify(client, auth, to="+15551234567", template="order_update", variables={"1": "A-1"})
        # Flow replies outside the window keep our copy in `body` next to the ContentSid.
        db.session.execute(sa.update(Message).where(Message.id == template_id).values(body="our copy"))
        db.session.commit()
        other_id = notify(client, auth, to="+15551234567", body="in flight")
        huey.flush()
        started = utcnow()
        # The other send reached Twilio; its answer (and SID) is not recorded yet.
        twilio_client = get_client()
        twilio_client.messages.create(to=contact.whatsapp_address, from_=SENDER, body="in flight")
        # In flight beside it: per-contact order makes this rare (an opt-out confirmation, which
        # never waits, or a send whose lease ran out), so put it there directly.
        db.session.execute(sa.update(Message).where(Message.id == other_id).values(status="dispatching", status_rank=1))
        db.session.commit()
        row = message(template_id)
        params = twilio_params(row, db.session.get(type(contact), contact.id))
        assert "body" not in params and params["content_sid"]
        assert match_accepted_send(row, params, recent_sends(twilio_client, params), started) is None
        # With nothing else in flight, a message Twilio took since the attempt began is ours.
        db.session.execute(sa.update(Message).where(Message.id == other_id).values(status="failed", status_rank=6))
        db.session.commit()
        row = message(template_id)
        [recent] = [m for m in twilio.messages if m["body"] == "in flight"]
        assert match_accepted_send(row, params, recent_sends(twilio_client, params), started).provider_id \
            == recent["sid"]


def test_a_flow_template_reply_that_timed_out_is_not_sent_twice(app, twilio):
    """Timeout lookup for a reply that carries both our copy and a ContentSid (outside the window)."""
    from bot.models import Contact, Kind
    from bot.conversations.replies import build_messages
    from flows.toolkit import Reply

    app.config["TWILIO_CONTENT_SIDS"] = {**CONTENT_SIDS, "appointment_no_response": "HX" + "c3" * 16}
    with app.app_context():
        contact = make_contact(inbound_ago=timedelta(days=2))
        [row] = build_messages([Reply("appointment/no_response", {"name": None, "date": "Mon", "time": "9:00",
                                                                    "place": None},
                                      content_template="appointment_no_response",
                                      content_variables={"1": "Mon", "2": "9:00"})],
                               db.session.get(Contact, contact.id), kind=Kind.REPLY)
        assert row.body and row.content_sid
        db.session.add(row)
        db.session.commit()
        message_id = row.id
    twilio.hang_next(2.5)  # Twilio accepts, but answers after the SDK's 2 s timeout
    with app.app_context():
        send_message(message_id)
    run_queue()
    assert len([r for r in twilio.requests if r["method"] == "POST"]) == 1
    with app.app_context():
        assert message(message_id).twilio_sid == twilio.messages[0]["sid"]


def test_a_second_task_does_not_jump_the_backoff(app, client, auth, twilio):
    """Twilio said 'slow down': a duplicate task (say, from the sweep) must not retry at once."""
    with app.app_context():
        make_contact()
    twilio.fail_next(429, 20429, "Too Many Requests", times=1)
    message_id = notify(client, auth, to="+15551234567", body="easy")
    first = huey.dequeue()
    with app.app_context():
        send_message(message_id)  # a duplicate task for the same row
    duplicate = huey.dequeue()
    huey.execute(first)  # fails with 429: retrying, the task's own retry is scheduled
    with app.app_context():
        assert message(message_id).status == "retrying"
    huey.execute(duplicate)  # not due yet: it leaves the row alone
    assert len([r for r in twilio.requests if r["method"] == "POST"]) == 1
    run_queue()  # the task's own retry (its delay is the backoff) sends it
    assert len(twilio.messages) == 1
    with app.app_context():
        row = message(message_id)
        assert (row.status, row.attempts) == ("queued", 2)


def test_an_unreachable_handset_is_retried_once_not_for_hours(app, client, auth, twilio):
    with app.app_context():
        make_contact()
    twilio.fail_next(400, 30003, "Unreachable destination handset", times=10)
    message_id = notify(client, auth, to="+15551234567", body="are you there")
    run_queue()
    with app.app_context():
        row = message(message_id)
        assert (row.status, row.error_code, row.attempts) == ("failed", 30003, 2)


def test_a_send_waiting_for_twilio_holds_no_database_connection(app, client, auth, twilio):
    """Many sends in flight, few connections: while Twilio is answering, the send's connection is
    back in the pool (docs/ARCHITECTURE.md, "How many sends at once")."""
    with app.app_context():
        make_contact()
    message_id = notify(client, auth, to="+15551234567", body="slow answer")
    huey.flush()
    twilio.hang_next(1.0)
    outcome: list[str] = []

    def send() -> None:
        with app.app_context():
            outcome.append(sender.deliver(message_id).value)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not twilio.messages and time.monotonic() < deadline:  # Twilio has it, the answer is late
            time.sleep(0.01)
        assert twilio.messages, "the send never reached the simulator"
        with app.app_context():
            assert db.engine.pool.checkedout() == 0
    finally:
        thread.join()
    assert outcome == ["sent"]


def test_batches_racing_send_each_message_once(app, client, auth, twilio):
    """Invariant 2 with batches: consumers claiming batches at the same time (threads with their
    own connections, as separate processes have; SKIP LOCKED on PostgreSQL) hand each message to
    Twilio exactly once."""
    app.config["SEND_BATCH"] = 10
    phones = [f"+1555200{i:04d}" for i in range(40)]
    with app.app_context():
        for phone in phones:
            make_contact(phone)
    ids = [notify(client, auth, to=phone, body=f"m{i}") for i, phone in enumerate(phones)]
    huey.flush()
    outcomes: list[str] = []

    def consume(chunk: list[str]) -> None:
        with app.app_context():
            for message_id in chunk:
                outcomes.append(sender.deliver(message_id).value)

    threads = [threading.Thread(target=consume, args=(ids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(m["body"] for m in twilio.messages) == sorted(f"m{i}" for i in range(40))
    assert "not_claimed" in outcomes  # batches took messages along before their own tasks ran
    with app.app_context():
        rows = [message(i) for i in ids]
        assert {(row.status, row.attempts) for row in rows} == {("queued", 1)}


def test_a_batch_takes_replies_first_and_one_message_per_contact(app):
    from bot.delivery.claims import claim_along

    with app.app_context():
        ada, bob, cy = (make_contact(p) for p in ("+15551230001", "+15551230002", "+15551230003"))

        def pending(contact, kind: str, body: str) -> str:
            row = Message(direction="outbound", kind=kind, contact_id=contact.id, body=body,
                          status="pending", status_rank=0)
            db.session.add(row)
            db.session.commit()
            return row.id

        first_to_ada = pending(ada, "notification", "ada 1")
        pending(ada, "notification", "ada 2")  # waits for "ada 1"
        to_bob = pending(bob, "notification", "bob")
        reply_to_cy = pending(cy, "reply", "cy")  # newest, but someone waits for it
        assert [row.id for row in claim_along("none", 1)] == [reply_to_cy]
        assert sorted(row.id for row in claim_along("none", 10)) == sorted([first_to_ada, to_bob])
        assert claim_along("none", 10) == []  # "ada 2" waits until "ada 1" is accepted
        # A broadcast's batch takes only a broadcast's messages, and no other batch takes them:
        # a reply is never sent from the bulk lane or process (invariant 16).
        dee = make_contact("+15551230004")
        to_dee = pending(dee, "broadcast", "dee")
        pending(bob, "reply", "bob again")  # waits for "bob", still unsent: in neither
        reply_to_eve = pending(make_contact("+15551230005"), "reply", "eve")
        assert [row.id for row in claim_along("none", 10, of_broadcast=True)] == [to_dee]
        assert [row.id for row in claim_along("none", 10)] == [reply_to_eve]
