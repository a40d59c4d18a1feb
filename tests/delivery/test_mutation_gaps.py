"""Tests that bench/mutation.py showed missing: each kills a mutant that every other test let
live (bench/MUTATION.md names them)."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import claims
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Contact, Message, StatusEvent
from bot.channels.whatsapp.client import build_client
from bot.channels.whatsapp.errors import is_retryable
from bot.channels.whatsapp.whatsapp import SESSION_WINDOW, within_window
from bot.vocabulary import Consent, Kind, MessageStatus
from bot.devtools.simulator import sign
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, SENDER, inbound_form, make_contact, run_queue, status_form
from tests.http.test_webhook import sent_message, stored

PHONE = "+15551234567"


def test_the_window_closes_at_exactly_24_hours():
    """Mutant window-boundary: WhatsApp's window is 24 hours; at 24 hours it is closed."""
    now = datetime(2026, 12, 5, 12, 0, 0)
    assert within_window(now - SESSION_WINDOW + timedelta(microseconds=1), now=now)
    assert not within_window(now - SESSION_WINDOW, now=now)


def test_a_status_of_the_same_rank_does_not_replace_the_one_stored(app, client, auth, post_webhook):
    """Mutant rank-equal-moves: `delivered` and `undelivered` rank the same (final); the first
    final status a callback brings stays (invariant 3), the later callback is kept as an event."""
    message_id, sid = sent_message(app, client, auth)
    assert post_webhook(status_form(sid, "delivered")).status_code == 200
    assert post_webhook(status_form(sid, "undelivered", error_code=30003)).status_code == 200
    assert stored(app, message_id).status == MessageStatus.DELIVERED
    with app.app_context():
        assert sorted(db.session.scalars(sa.select(StatusEvent.status))) == ["delivered", "undelivered"]


def test_the_configured_webhook_url_is_the_one_verified(client):
    """Mutant signature-configured-url-ignored: behind a proxy the app is reached at an internal
    address; Twilio signed the public TWILIO_WEBHOOK_URL, and only a signature over it passes."""
    form = inbound_form(PHONE, "hello")
    internal = "http://10.0.0.5:8000"
    public_signature = sign(AUTH_TOKEN, "https://bot.example.test/twilio/webhook", form)
    response = client.post("/twilio/webhook", data=form, base_url=internal,
                           headers={"X-Twilio-Signature": public_signature})
    assert response.status_code == 200
    internal_signature = sign(AUTH_TOKEN, internal + "/twilio/webhook", inbound_form(PHONE, "again"))
    response = client.post("/twilio/webhook", data=inbound_form(PHONE, "again"), base_url=internal,
                           headers={"X-Twilio-Signature": internal_signature})
    assert response.status_code == 403


def test_an_opt_out_confirmation_does_not_wait_behind_a_message_in_flight(app, client, auth, post_webhook, twilio):
    """Mutant claim-confirmation-waits: an older notification is held by a stalled worker (its
    lease still running) when the contact sends STOP; the confirmation goes at once (invariant 9's
    one exception), and nothing else does."""
    with app.app_context():
        make_contact(PHONE)
    promo = client.post("/notify", json={"to": PHONE, "body": "promo"}, headers=auth).get_json()["id"]
    huey.flush()
    with app.app_context():
        db.session.execute(sa.update(Message).where(Message.id == promo).values(
            status=MessageStatus.DISPATCHING, status_rank=MessageStatus.DISPATCHING.rank,
            claimed_until=utcnow() + timedelta(minutes=5), attempts=1))
        db.session.commit()
    assert post_webhook(inbound_form(PHONE, "STOP")).status_code == 200
    run_queue()
    with app.app_context():
        confirmation = db.session.scalar(sa.select(Message).where(Message.kind == Kind.OPT_OUT_CONFIRMATION))
        assert confirmation is not None and confirmation.twilio_sid is not None
        assert db.session.get(Message, promo).status == MessageStatus.DISPATCHING  # still held
    assert [m["body"] for m in twilio.messages] == [confirmation.body]
    with app.app_context():
        assert db.session.scalar(sa.select(Contact.consent).where(Contact.phone == PHONE)) == Consent.OPTED_OUT


def notify(client, auth, body: str, to: str = PHONE) -> str:
    response = client.post("/notify", json={"to": to, "body": body}, headers=auth)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def posts(twilio) -> int:
    return len([r for r in twilio.requests if r["method"] == "POST"])


def test_a_retrying_message_holds_its_contacts_later_one_back(app, client, auth, twilio):
    """Mutant unsent-retrying-ignored: a message between attempts (`retrying`) is still unsent;
    the contact's next message waits for it, then follows it (invariant 9)."""
    with app.app_context():
        make_contact(PHONE)
    twilio.fail_next(503, 20503, "Service Unavailable")  # refused outright: retried, no lookup
    first = notify(client, auth, "first")
    run_queue(include_scheduled=False)  # its huey retry stays scheduled
    assert stored(app, first).status == MessageStatus.RETRYING
    second = notify(client, auth, "second")
    run_queue(include_scheduled=False)
    assert twilio.messages == []  # the later one did not overtake
    assert stored(app, second).status == MessageStatus.PENDING
    run_queue()  # the retry is due: the first goes, and hands the turn on
    assert [m["body"] for m in twilio.messages] == ["first", "second"]


def test_a_lookup_never_adopts_another_message_to_the_same_recipient(app, client, auth, twilio):
    """Mutant lookup-body-ignored: after an answer is lost, Twilio lists a message from our number
    to the same recipient, sent since, with another body (another system, the console). It is
    not ours: adopting its SID would record ours as sent and never send it."""
    with app.app_context():
        make_contact(PHONE)
    others = build_client(ACCOUNT_SID, AUTH_TOKEN, twilio.url, 5).messages.create(
        to="whatsapp:" + PHONE, from_=SENDER, body="someone else's")
    twilio.fail_next(502, 0, "bad gateway")  # a proxy's 502: Twilio stored nothing of ours
    message_id = notify(client, auth, "ours")
    run_queue()
    assert [m["body"] for m in twilio.messages] == ["someone else's", "ours"]
    with app.app_context():
        row = stored(app, message_id)
        assert (row.status, row.twilio_sid) == (MessageStatus.QUEUED, twilio.messages[1]["sid"])
        assert row.twilio_sid != others.sid


def test_a_batch_slower_than_its_lease_keeps_its_claim(app, client, auth, twilio, monkeypatch):
    """Mutant lease-renewal-now: the lease is renewed while Twilio takes its time, so another
    worker cannot re-take the claim (and look up, or send) while the call is still on the wire.
    Here the lease is 1 s and Twilio answers after 3 s (within the client's 6 s timeout)."""
    monkeypatch.setattr(claims, "LEASE_MARGIN", timedelta(seconds=-5))
    with app.app_context():
        make_contact(PHONE)
        app.config["TWILIO_TIMEOUT"] = 6
        app.extensions["twilio_client"] = None  # built again, with that timeout
        assert claims.claim_lease() == timedelta(seconds=1)
    twilio.hang_next(3)  # accepted on arrival, answered 3 s later
    message_id = notify(client, auth, "slow")
    reclaimed: list = []

    def another_worker() -> None:
        deadline = time.monotonic() + 30
        while not posts(twilio) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.8)  # well past the first lease; Twilio has not answered yet
        with app.app_context():
            reclaimed.append(claims.claim(message_id))
            db.session.remove()

    worker = threading.Thread(target=another_worker)
    worker.start()
    run_queue()
    worker.join()
    assert reclaimed == [None]
    assert posts(twilio) == 1 and len(twilio.messages) == 1
    with app.app_context():
        row = stored(app, message_id)
        assert (row.status, row.attempts, row.twilio_sid) == (MessageStatus.QUEUED, 1, twilio.messages[0]["sid"])


def test_an_error_code_is_kept_when_the_status_cannot_move(app, client, auth, post_webhook):
    """Mutant error-dropped-when-status-stays: a `failed` 63016 arriving after `read` cannot move
    the status, and its error code is kept all the same (invariant 3: never lost)."""
    message_id, sid = sent_message(app, client, auth)
    assert post_webhook(status_form(sid, "read")).status_code == 200
    assert post_webhook(status_form(sid, "failed", error_code=63016)).status_code == 200
    row = stored(app, message_id)
    assert (row.status, row.error_code) == (MessageStatus.READ, 63016)


def test_a_plain_500_is_retried_not_failed(app, client, auth, twilio):
    """Mutant retry-500-excluded: Twilio's 500 (20500) is a server error worth another try, answered
    at once here (no client timeout in the way). It is looked up first (AMBIGUOUS_HTTP_STATUSES),
    then sent."""
    assert is_retryable(500, 20500) and is_retryable(500, None)
    with app.app_context():
        make_contact(PHONE)
    twilio.fail_next(500, 20500, "Internal Server Error")
    message_id = notify(client, auth, "after a 500")
    run_queue()
    assert [m["body"] for m in twilio.messages] == ["after a 500"]
    row = stored(app, message_id)
    assert (row.status, row.attempts) == (MessageStatus.QUEUED, 2)
