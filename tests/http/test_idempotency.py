"""One Idempotency-Key space for messages and flows (POST /notify): a key creates one thing,
whatever the requests that use it ask for, and every repeat gets the first answer or a 422."""
from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from bot.extensions import db
from bot.http import notify as notify_module
from bot.models import Conversation, IdempotencyKey, Message
from bot.vocabulary import ConversationStatus, IdempotentKind
from tests.conftest import make_contact, run_queue

PHONE = "+15551234567"
MESSAGE = {"to": PHONE, "body": "Your order shipped"}
FLOW = {"to": PHONE, "flow": "feedback"}


@pytest.fixture
def contact(app):
    with app.app_context():
        make_contact(PHONE)


def counts(app) -> tuple[int, int]:
    """(messages, conversations) stored."""
    with app.app_context():
        return (db.session.scalar(sa.select(sa.func.count()).select_from(Message)),
                db.session.scalar(sa.select(sa.func.count()).select_from(Conversation)))


def test_a_repeated_flow_request_gets_the_first_answer(app, client, auth, contact):
    key = {**auth, "Idempotency-Key": "survey-7"}
    first = client.post("/notify", json=FLOW, headers=key)
    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    run_queue()  # the worker starts it: the repeat still names the same conversation
    second = client.post("/notify", json=FLOW, headers=key)
    assert second.status_code == 202, second.get_json()
    assert second.get_json()["id"] == first.get_json()["id"]
    assert second.get_json()["flow"] == "feedback"
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert second.headers["Location"] == first.headers["Location"]
    with app.app_context():
        conversations = db.session.scalars(sa.select(Conversation)).all()
        assert [c.id for c in conversations] == [first.get_json()["id"]]
        assert conversations[0].status == ConversationStatus.ACTIVE
        used = db.session.get(IdempotencyKey, "survey-7")
        assert (used.kind, used.target_id) == (IdempotentKind.CONVERSATION, first.get_json()["id"])


@pytest.mark.parametrize("first_payload,second_payload", [(MESSAGE, FLOW), (FLOW, MESSAGE)],
                         ids=["message-then-flow", "flow-then-message"])
def test_a_key_used_for_a_message_and_then_a_flow_is_422(app, client, auth, contact, first_payload, second_payload):
    key = {**auth, "Idempotency-Key": "one-space"}
    assert client.post("/notify", json=first_payload, headers=key).status_code == 202
    second = client.post("/notify", json=second_payload, headers=key)
    assert second.status_code == 422
    assert "Idempotency-Key" in second.get_json()["error"]
    assert sum(counts(app)) == 1


@pytest.mark.timeout(120)
def test_concurrent_message_and_flow_with_one_key_create_one_thing(app, auth, contact, monkeypatch):
    """Two message requests and two flow requests with one key, all past the replay check before
    any of them commits (they meet at a barrier once the key was looked up and found unused):
    the key's one row decides, so exactly one thing is created, the requests asking for the same
    get its answer and the others the 422."""
    racers = 4
    all_past_the_lookup = threading.Barrier(racers)
    # A flow's request finds its contact next; a message's writes its contact, row and key next.
    real_contact, real_message = notify_module.get_or_create_contact, notify_module._notify_number

    def contact_after_the_lookup(phone: str):
        all_past_the_lookup.wait(30)  # every request has looked the key up and found nothing
        return real_contact(phone)

    def message_after_the_lookup(notification, key):
        all_past_the_lookup.wait(30)
        return real_message(notification, key)

    monkeypatch.setattr(notify_module, "get_or_create_contact", contact_after_the_lookup)
    monkeypatch.setattr(notify_module, "_notify_number", message_after_the_lookup)
    answers: list[tuple[str, int, dict]] = []

    def post(kind: str, payload: dict) -> None:
        response = app.test_client().post("/notify", json=payload, headers={**auth, "Idempotency-Key": "race-mixed"})
        answers.append((kind, response.status_code, response.get_json()))

    threads = [threading.Thread(target=post, args=(kind, payload))
               for kind, payload in [("message", MESSAGE), ("flow", FLOW)] * (racers // 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == racers
    assert sum(counts(app)) == 1, answers
    accepted = [(kind, body["id"]) for kind, status, body in answers if status == 202]
    refused = [kind for kind, status, body in answers if status == 422]
    assert len(accepted) + len(refused) == racers, answers  # no 500
    assert len({kind for kind, _ in accepted}) == 1 and len({id_ for _, id_ in accepted}) == 1
    assert len(accepted) == racers // 2 and set(refused) == {"message", "flow"} - {accepted[0][0]}
    with app.app_context():
        used = db.session.get(IdempotencyKey, "race-mixed")
        assert used.target_id == accepted[0][1]


def test_migration_0004_carries_the_keys_already_stored(tmp_path) -> None:
    """Keys stored on messages and conversations before 0004 keep answering after it."""
    import os
    import sqlite3
    import subprocess

    from tests.test_migrations import FLASK, PROJECT_ROOT, SECRETS

    database = tmp_path / "keys.db"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT),
           "DATABASE_URL": f"sqlite:///{database}", "INSTANCE_PATH": str(tmp_path / "instance"), **SECRETS}

    def upgrade(*revision: str) -> None:
        result = subprocess.run([str(FLASK), "--app", "wsgi", "db", "upgrade", *revision], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    upgrade("0003")
    with sqlite3.connect(database) as connection:
        connection.execute("INSERT INTO contacts (id, phone, consent, created_at, updated_at) "
                           "VALUES (1, '+15551234567', 'opted_in', '2026-01-01', '2026-01-01')")
        connection.execute("INSERT INTO messages (id, direction, kind, contact_id, status, status_rank, "
                           "idempotency_key, request_hash, attempts, created_at, updated_at) VALUES "
                           "('m1', 'outbound', 'notification', 1, 'sent', 5, 'k-m', 'hash-m', 1, '2026-01-01', '2026-01-01')")
        connection.execute("INSERT INTO conversations (id, contact_id, flow, status, data, started_by, idempotency_key, "
                           "request_hash, started_at, updated_at, attempts) VALUES "
                           "('c1', 1, 'feedback', 'active', '{}', 'backend', 'k-c', 'hash-c', '2026-01-02', '2026-01-02', 0)")
    connection.close()
    upgrade()
    with sqlite3.connect(database) as connection:
        rows = sorted(connection.execute("SELECT key, kind, target_id, request_hash FROM idempotency_keys"))
    connection.close()
    assert rows == [("k-c", "conversation", "c1", "hash-c"), ("k-m", "message", "m1", "hash-m")]
