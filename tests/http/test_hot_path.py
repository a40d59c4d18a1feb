"""The web's hot path (issue 17): statements per request, and what the fewer statements must keep.

The inbound webhook and /notify to a number write in one statement on PostgreSQL (CTEs), two on
SQLite (no data-modifying CTE), and commit once. Counted with a listener on the engine, never
timed (the CPU figures are in bench/THROUGHPUT.md). The rest checks the invariants those single
statements now carry: a repeated MessageSid changes nothing, a late message never moves the
window back, an empty profile field keeps the stored one, the refusals still refuse.
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.conversations.inbound import store_inbound
from bot.delivery.queue import huey
from bot.extensions import db
from bot.models import Contact, IdempotencyKey, Message
from tests.conftest import inbound_form, make_contact

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
