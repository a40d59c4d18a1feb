"""Sends whose fate is unknown "may have been accepted": Twilio is asked before another attempt.

Each fault is made real: the simulator accepts the message and then loses the answer (a dropped
connection, a proxy's 502/504), a worker's lease runs out after Twilio took the message, the
database fails right after Twilio's 201, the API is unreachable. What was really sent is counted
at the simulator (docs/ARCHITECTURE.md, invariant 2).
"""
from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import claims, outbox, sender, shutdown
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Message
from bot.channels.whatsapp.client import build_client, get_client
from bot.channels.whatsapp.errors import request_never_left
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, SENDER, make_contact, run_queue


def notify(client, auth, body: str, to: str = "+15551234567") -> str:
    response = client.post("/notify", json={"to": to, "body": body}, headers=auth)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def row(message_id: str) -> Message:
    db.session.expire_all()
    return db.session.get(Message, message_id)


def posts(twilio) -> int:
    return len([r for r in twilio.requests if r["method"] == "POST"])


def lookups(twilio) -> int:
    return len([r for r in twilio.requests if r["method"] == "GET" and r["path"].endswith("/Messages.json")])


@pytest.mark.parametrize("lost", ["drop", 502, 504, 500, "garbled"])
def test_an_answer_lost_after_twilio_accepted_is_looked_up_not_resent(app, client, auth, twilio, lost):
    """A connection dropped after the request was written, a proxy's 502/504, Twilio's own 500
    (20500: its docs warn a retried send may reach the user twice), or a 201 the client cannot
    read (an error the sender does not recognise): Twilio has the message. The worker asks before
    sending again, so the user gets it once."""
    with app.app_context():
        make_contact()
    twilio.lose_answer_next(lost)
    message_id = notify(client, auth, "your code is 1234")
    run_queue()
    assert [m["body"] for m in twilio.messages] == ["your code is 1234"]
    assert posts(twilio) == 1 and lookups(twilio) == 1
    with app.app_context():
        sent = row(message_id)
        assert (sent.status, sent.twilio_sid, sent.attempts) == ("queued", twilio.messages[0]["sid"], 1)
        assert sent.unsure_since is None


def test_a_lost_answer_that_twilio_did_not_accept_is_sent_after_the_lookup(app, client, auth, twilio):
    """The proxy answered 502 and Twilio never had it: the lookup finds nothing, the retry sends."""
    with app.app_context():
        make_contact()
    twilio.fail_next(502, 0, "bad gateway")  # refused before Twilio stored anything
    message_id = notify(client, auth, "hello once")
    run_queue()
    assert [m["body"] for m in twilio.messages] == ["hello once"]
    assert posts(twilio) == 2 and lookups(twilio) >= 1
    with app.app_context():
        assert row(message_id).status == "queued"


def test_a_lease_that_ran_out_after_twilio_accepted_is_not_sent_again(app, client, auth, twilio):
    """The worker died after Twilio's 201 and before the SID was committed (SIGKILL, a crash):
    whoever re-takes the expired claim finds the message at Twilio and records it."""
    with app.app_context():
        contact = make_contact()
        message_id = notify(client, auth, "sent by a worker that died")
        huey.flush()  # that worker had taken the task
        claimed = claims.claim(message_id)
        assert claimed is not None and claimed.unsure_since is None
        # It reached Twilio (the real SDK, as the dead worker would have called it) ...
        accepted = get_client().messages.create(to=contact.whatsapp_address, from_=SENDER,
                                                       body="sent by a worker that died")
        # ... and died. Time passes beyond the lease.
        db.session.execute(sa.update(Message).values(claimed_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert outbox.sweep()["outbound"] == 1
    run_queue()
    assert posts(twilio) == 1, "the message was sent a second time"
    with app.app_context():
        recorded = row(message_id)
        assert (recorded.twilio_sid, recorded.status, recorded.unsure_since) == (accepted.sid, "queued", None)


def test_a_lease_that_ran_out_before_the_send_is_sent_after_the_lookup(app, client, auth, twilio):
    with app.app_context():
        make_contact()
        message_id = notify(client, auth, "never left")
        huey.flush()
        assert claims.claim(message_id)
        db.session.execute(sa.update(Message).values(claimed_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert outbox.sweep()["outbound"] == 1
        assert row(message_id).status == "dispatching"
    run_queue()
    assert [m["body"] for m in twilio.messages] == ["never left"]
    assert lookups(twilio) == 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_is_retried_without_a_lookup(app, client, auth, twilio):
    """Connection refused proves the request never left: the retry needs no lookup."""
    with app.app_context():
        make_contact()
        message_id = notify(client, auth, "after the refusal")
        huey.flush()
        app.extensions["twilio_client"] = build_client(ACCOUNT_SID, AUTH_TOKEN, f"http://127.0.0.1:{closed_port()}", 2)
        assert sender.deliver(message_id) == sender.Outcome.RETRY
        refused = row(message_id)
        assert (refused.status, refused.unsure_since) == ("retrying", None)
        app.extensions["twilio_client"] = None  # Twilio is back
        db.session.execute(sa.update(Message).values(next_attempt_at=utcnow()))
        db.session.commit()
        assert sender.deliver(message_id) == sender.Outcome.SENT
    assert lookups(twilio) == 0 and posts(twilio) == 1


def test_a_failed_lookup_never_sends_blind(app, client, auth, twilio):
    """A send of unknown fate whose lookup cannot reach Twilio waits; it is not sent blind."""
    with app.app_context():
        make_contact()
        twilio.lose_answer_next("drop")
        message_id = notify(client, auth, "maybe delivered")
        huey.flush()
        app.extensions["twilio_client"] = build_client(ACCOUNT_SID, AUTH_TOKEN, twilio.url, 2)
        # The answer is lost, and then Twilio's API goes away before the lookup.
        assert sender.deliver(message_id) == sender.Outcome.SENT  # found by the immediate lookup
        assert posts(twilio) == 1
        # Again, with the lookup failing: a second message of unknown fate.
        second = notify(client, auth, "maybe delivered too")
        huey.flush()
        twilio.lose_answer_next("drop")
        dead = build_client(ACCOUNT_SID, AUTH_TOKEN, f"http://127.0.0.1:{closed_port()}", 2)
        real = get_client()

        class LookupsFail:  # the real client, with listing pointed at a dead port
            messages = type("M", (), {"create": real.messages.create, "list": dead.messages.list})()

        app.extensions["twilio_client"] = LookupsFail()
        assert sender.deliver(second) == sender.Outcome.RETRY
        unsure = row(second)
        assert unsure.status == "retrying" and unsure.unsure_since is not None
        assert posts(twilio) == 2
        # Next attempt, lookups failing still: no POST at all.
        db.session.execute(sa.update(Message).where(Message.id == second).values(next_attempt_at=utcnow()))
        db.session.commit()
        assert sender.deliver(second) == sender.Outcome.RETRY
        assert posts(twilio) == 2
        # Twilio's API back: the lookup finds the message, nothing is sent again.
        app.extensions["twilio_client"] = real
        db.session.execute(sa.update(Message).where(Message.id == second).values(next_attempt_at=utcnow()))
        db.session.commit()
        assert sender.deliver(second) == sender.Outcome.SENT
        assert row(second).twilio_sid == twilio.messages[1]["sid"]
    assert posts(twilio) == 2


class FailingRecord:
    """Makes the UPDATE that records Twilio's answer fail `times` times with a database error,
    as a failover or a dropped connection would right after Twilio's 201."""

    def __init__(self, times: int) -> None:
        self.times = times

    def __call__(self, conn, cursor, statement, parameters, context, executemany):
        text = statement.lstrip().lower()
        if self.times > 0 and text.startswith("update messages set") and "twilio_sid=" in text.replace(" ", ""):
            self.times -= 1
            raise sa.exc.OperationalError(statement, parameters, Exception("server closed the connection"))


def test_a_database_error_after_twilios_201_retries_the_commit_not_the_send(app, client, auth, twilio):
    with app.app_context():
        make_contact()
        message_id = notify(client, auth, "recorded on the third try")
        huey.flush()
        failing = FailingRecord(times=2)
        sa.event.listen(db.engine, "before_cursor_execute", failing)
        try:
            assert sender.deliver(message_id) == sender.Outcome.SENT
        finally:
            sa.event.remove(db.engine, "before_cursor_execute", failing)
        assert failing.times == 0
        assert row(message_id).twilio_sid == twilio.messages[0]["sid"]
    assert posts(twilio) == 1


def test_a_database_outage_longer_than_the_retries_is_settled_by_the_lookup(app, client, auth, twilio, monkeypatch):
    monkeypatch.setattr(sender, "RECORD_RETRIES", 1)
    with app.app_context():
        make_contact()
        message_id = notify(client, auth, "accepted while the database was away")
        huey.flush()
        failing = FailingRecord(times=2)
        sa.event.listen(db.engine, "before_cursor_execute", failing)
        try:
            assert sender.deliver(message_id) == sender.Outcome.RETRY
        finally:
            sa.event.remove(db.engine, "before_cursor_execute", failing)
        assert row(message_id).status == "dispatching"  # its claim stands until the lease runs out
        db.session.execute(sa.update(Message).values(claimed_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert outbox.sweep()["outbound"] == 1
    run_queue()
    assert posts(twilio) == 1
    with app.app_context():
        assert row(message_id).twilio_sid == twilio.messages[0]["sid"]


def test_a_stopping_worker_starts_no_new_send_and_gives_the_message_back(app, client, auth, twilio):
    with app.app_context():
        make_contact()
        message_id = notify(client, auth, "after the deploy")
        huey.flush()
        shutdown.stopping.set()
        try:
            assert sender.deliver(message_id) == sender.Outcome.RELEASED
            # Claimed along by a batch that started before the stop: released, attempt not counted.
            claimed = claims.claim(message_id)
            assert claimed is not None
            outcomes = sender.send_claimed([claimed])
            assert outcomes[message_id] == sender.Outcome.RELEASED
            released = row(message_id)
            assert (released.status, released.attempts, released.claimed_until) == ("retrying", 0, None)
        finally:
            shutdown.stopping.clear()
    assert posts(twilio) == 0
    assert run_queue() >= 1  # it went back on the queue; the next worker sends it
    assert [m["body"] for m in twilio.messages] == ["after the deploy"]


def test_which_errors_prove_the_request_never_left():
    """Classified on real exceptions from real sockets, not on hand-made ones."""
    with pytest.raises(requests.ConnectionError) as refused:
        requests.post(f"http://127.0.0.1:{closed_port()}/", timeout=2)
    assert request_never_left(refused.value)

    with socket.socket() as server:  # accepts, reads the request, closes without answering
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        import threading

        def drop() -> None:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.close()

        threading.Thread(target=drop, daemon=True).start()
        with pytest.raises(requests.ConnectionError) as dropped:
            requests.post(f"http://127.0.0.1:{server.getsockname()[1]}/", data={"a": "b"}, timeout=2)
    assert not request_never_left(dropped.value)
    assert not request_never_left(requests.ReadTimeout("read timed out"))
