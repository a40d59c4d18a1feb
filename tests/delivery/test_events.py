"""Events to the backend: written with their change, pushed signed, at least once, in per-contact order.

A real HTTP receiver on 127.0.0.1 verifies every request with the `standardwebhooks` library, as a
backend would (docs/ARCHITECTURE.md, invariant 12).
"""
from __future__ import annotations

import base64
import random
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from bot import create_app
from bot.clock import utcnow
from bot.config import ConfigError
from bot.conversations.consent import change_consent
from bot.delivery import event_delivery
from bot.extensions import db
from bot.models import Contact, Event, Message
from bot.delivery.queue import huey
from tests.conftest import API_TOKEN, empty_tables, in_process_queue_options, inbound_form, make_contact, run_queue, status_form

SECRET = "whsec_" + base64.b64encode(b"events-test-secret-0123456789ab").decode()
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


class Receiver:
    """A backend's events endpoint: verifies each request and answers from a script of statuses."""

    def __init__(self) -> None:
        self.verified: list[dict[str, Any]] = []  # {"id", "type", "data", ...} per verified request
        self.rejected = 0
        self.answers: list[int] = []  # the next answers (then 204 for ever)
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/events"

    def _app(self, environ, start_response):
        request = Request(environ)
        body = request.get_data()
        try:
            payload = Webhook(SECRET).verify(body, dict(request.headers))
        except WebhookVerificationError:
            with self._lock:
                self.rejected += 1
            return Response("bad signature", status=400)(environ, start_response)
        with self._lock:
            status = self.answers.pop(0) if self.answers else 204
            self.verified.append({"id": request.headers["webhook-id"], "status": status, **payload})
        return Response("", status=status)(environ, start_response)

    def delivered(self) -> list[dict[str, Any]]:
        """What was answered 2xx, in arrival order."""
        return [request for request in self.verified if 200 <= request["status"] < 300]

    def __enter__(self) -> "Receiver":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def events_app(base_config, _schema, twilio, receiver, monkeypatch) -> Iterator[Any]:
    """The app with EVENTS_WEBHOOK_URL pointing at the receiver. Time is driven by the tests
    (`retries_come_due`), so a failed attempt holds the others back for no time at all."""
    monkeypatch.setattr(event_delivery, "HOLD_BACK", timedelta(0))
    app = create_app({**base_config, "TESTING": True, "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config),
                      "EVENTS_WEBHOOK_URL": receiver.url, "EVENTS_WEBHOOK_SECRET": SECRET})
    with app.app_context():
        empty_tables()
    huey.flush()
    twilio.reset()
    event_delivery._receiver_down_until = 0.0
    yield app
    event_delivery._receiver_down_until = 0.0
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    huey.flush()


def post_webhook(app, form: dict[str, str]):
    from bot.devtools.simulator import sign
    from tests.conftest import AUTH_TOKEN, PUBLIC_BASE, WEBHOOK_URL

    return app.test_client().post("/twilio/webhook", data=form, base_url=PUBLIC_BASE,
                                  headers={"X-Twilio-Signature": sign(AUTH_TOKEN, WEBHOOK_URL, form)})


def notify(app, **payload) -> str:
    response = app.test_client().post("/notify", json=payload, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def retries_come_due(app, max_tasks: int = 200) -> None:
    """Time passes: every pending event is due, and the sweep puts it back on the queue."""
    with app.app_context():
        db.session.execute(sa.update(Event).where(Event.status == "pending")
                           .values(next_attempt_at=utcnow() - timedelta(minutes=2), claimed_until=None))
        db.session.commit()
        event_delivery.sweep()
    event_delivery._receiver_down_until = 0.0
    run_queue(max_tasks=max_tasks)


def stored_events(app, **where) -> list[Event]:
    with app.app_context():
        db.session.expire_all()
        query = sa.select(Event).order_by(Event.seq)
        for name, value in where.items():
            query = query.where(getattr(Event, name) == value)
        rows = db.session.scalars(query).all()
        db.session.expunge_all()
        return rows


def test_a_notifications_statuses_reach_the_backend_signed_once_per_transition(events_app, receiver, twilio):
    with events_app.app_context():
        make_contact()
    message_id = notify(events_app, to="+15551234567", body="Your order shipped", metadata={"order_id": "A-17"})
    run_queue()
    sid = twilio.messages[0]["sid"]
    # Twilio's callbacks, repeated and out of order: sent after delivered is no transition.
    for status in ("delivered", "sent", "delivered", "read", "sent", "read"):
        assert post_webhook(events_app, status_form(sid, status)).status_code == 200
    run_queue()
    assert receiver.rejected == 0
    statuses = [(e["type"], e["data"]["status"]) for e in receiver.delivered()]
    assert statuses == [("message.status", "queued"), ("message.status", "delivered"), ("message.status", "read")]
    first = receiver.delivered()[0]
    assert first["data"]["message_id"] == message_id and first["data"]["to"] == "+15551234567"
    assert first["data"]["metadata"] == {"order_id": "A-17"}
    assert first["timestamp"].endswith("Z") and set(first) >= {"type", "timestamp", "data"}
    assert all(event.status == "delivered" for event in stored_events(events_app))


def test_a_failed_send_reports_its_error_code(events_app, receiver, twilio):
    with events_app.app_context():
        make_contact()
    twilio.fail_next(400, 63024, "Invalid message recipient")
    notify(events_app, to="+15551234567", body="nope")
    run_queue()
    [event] = receiver.delivered()
    assert (event["data"]["status"], event["data"]["error_code"]) == ("failed", 63024)


def test_inbound_conversation_and_consent_events(events_app, receiver, twilio):
    """A new user writes: the welcome starts; YES opts in and completes it; STOP opts out."""
    post_webhook(events_app, inbound_form(body="hello bot", ProfileName="Ada"))
    run_queue()
    post_webhook(events_app, inbound_form(body="yes"))
    run_queue()
    post_webhook(events_app, inbound_form(body="STOP"))
    run_queue()
    types = [e["type"] for e in receiver.delivered() if e["type"] != "message.status"]
    assert types == ["conversation.started", "message.received", "contact.opted_in", "conversation.completed",
                     "message.received", "contact.opted_out", "message.received"]
    first = next(e for e in receiver.delivered() if e["type"] == "message.received")
    assert first["data"]["from"] == "+15551234567" and first["data"]["body"] == "hello bot"
    assert first["data"]["profile_name"] == "Ada" and first["data"]["answered"] is True
    assert first["data"]["flow"] == "welcome" and first["data"]["handoff"] is False
    opted_out = next(e for e in receiver.delivered() if e["type"] == "contact.opted_out")
    assert opted_out["data"]["source"] == "keyword" and opted_out["data"]["words"]


def test_a_rolled_back_change_emits_nothing(events_app):
    with events_app.app_context():
        contact = make_contact(consent="unknown")
        change_consent(contact, "opted_in", source="api")
        db.session.rollback()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Event)) == 0
        assert huey.pending_count() == 0
        change_consent(db.session.get(Contact, contact.id), "opted_in", source="api")
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Event)) == 1


def test_a_receiver_that_fails_for_a_while_gets_every_event_in_order_with_the_same_ids(events_app, receiver, twilio):
    with events_app.app_context():
        make_contact()
    receiver.answers = [500, 503, 502]  # down for three attempts, then well
    ids = [notify(events_app, to="+15551234567", body=f"n{i}") for i in range(3)]
    run_queue()
    for _ in range(4):
        retries_come_due(events_app)
    delivered = receiver.delivered()
    assert [e["data"]["message_id"] for e in delivered] == ids  # per-contact order kept
    first_event_id = stored_events(events_app)[0].id
    attempts_of_first = [r for r in receiver.verified if r["id"] == first_event_id]
    assert [r["status"] for r in attempts_of_first][-1] == 204 and len(attempts_of_first) >= 2
    assert len({r["id"] for r in delivered}) == 3  # one delivery per event, same id on every retry


def test_a_receiver_down_longer_than_the_schedule_catches_up_by_replay(events_app, receiver, twilio):
    with events_app.app_context():
        make_contact()
    receiver.answers = [500] * (len(event_delivery.SCHEDULE) + 1)
    notify(events_app, to="+15551234567", body="lost for a day")
    run_queue()
    for _ in range(len(event_delivery.SCHEDULE) + 1):
        retries_come_due(events_app)
    [event] = stored_events(events_app)
    assert (event.status, event.attempts) == ("failed", len(event_delivery.SCHEDULE) + 1)
    assert receiver.delivered() == []
    client = events_app.test_client()
    failed = client.get("/events?status=failed", headers=AUTH).get_json()["events"]
    assert [e["id"] for e in failed] == [event.id]
    assert client.post("/events/retry", json={"since": "2000-01-01T00:00:00Z"}, headers=AUTH).get_json() == {"retried": 1}
    run_queue()
    [delivered] = receiver.delivered()
    assert delivered["id"] == event.id


def test_get_events_pages_oldest_first_and_filters(events_app, receiver, twilio):
    with events_app.app_context():
        make_contact()
        make_contact("+15557654321")
    for phone in ("+15551234567", "+15557654321", "+15551234567"):
        notify(events_app, to=phone, body="hi")
    run_queue()
    client = events_app.test_client()
    assert client.get("/events").status_code == 401
    page = client.get("/events?limit=2", headers=AUTH).get_json()
    assert len(page["events"]) == 2 and page["has_more"] is True
    rest = client.get(f"/events?after={page['next_after']}", headers=AUTH).get_json()
    assert rest["has_more"] is False and len(rest["events"]) == 1
    everything = page["events"] + rest["events"]
    assert [e["id"] for e in everything] == [e.id for e in stored_events(events_app)]
    mine = client.get("/events?contact=%2B15557654321", headers=AUTH).get_json()["events"]
    assert [e["data"]["to"] for e in mine] == ["+15557654321"]
    assert client.get("/events?type=message.status&status=delivered", headers=AUTH).status_code == 200
    for bad in ("type=nope", "status=nope", "after=123", "after=" + "a" * 32, "limit=0", "contact=12"):
        response = client.get(f"/events?{bad}", headers=AUTH)
        assert response.status_code == 400 and response.get_json()["error"], bad


def test_events_types_filters_what_is_pushed_but_everything_is_stored(base_config, _schema, twilio, receiver):
    app = create_app({**base_config, "TESTING": True, "EVENTS_WEBHOOK_URL": receiver.url,
                      "EVENTS_WEBHOOK_SECRET": SECRET, "EVENTS_TYPES": "message.received",
                      "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    with app.app_context():
        empty_tables()
    huey.flush()
    post_webhook(app, inbound_form(body="hello"))
    run_queue()
    assert {e["type"] for e in receiver.delivered()} == {"message.received"}
    with app.app_context():
        statuses = dict(db.session.execute(sa.select(Event.type, Event.status)).all())
        db.session.remove()
        db.engine.dispose()
    assert statuses["message.received"] == "delivered" and statuses["conversation.started"] == "stored"


def test_a_url_without_a_secret_stops_start_up_naming_it(base_config):
    with pytest.raises(ConfigError, match="EVENTS_WEBHOOK_SECRET"):
        create_app({**base_config, "EVENTS_WEBHOOK_URL": "https://backend.example.com/events"})
    with pytest.raises(ConfigError, match="EVENTS_WEBHOOK_SECRET"):
        create_app({**base_config, "EVENTS_WEBHOOK_URL": "https://backend.example.com/events",
                    "EVENTS_WEBHOOK_SECRET": "not-a-secret"})


# --- human handoff -------------------------------------------------------------------------------

def bot_replies(twilio) -> list[str]:
    return [m["body"] for m in twilio.messages]


def test_handoff_silences_the_bot_pushes_inbound_obeys_stop_and_is_released(events_app, receiver, twilio):
    client = events_app.test_client()
    post_webhook(events_app, inbound_form(body="hello"))  # the welcome starts
    run_queue()
    answered = len(bot_replies(twilio))
    response = client.post("/contacts/+15551234567/handoff", json={"reason": "billing question"}, headers=AUTH)
    assert response.status_code == 200 and response.get_json()["handoff"] is True
    post_webhook(events_app, inbound_form(body="I was charged twice"))
    run_queue()
    assert len(bot_replies(twilio)) == answered  # the bot said nothing
    received = [e for e in receiver.delivered() if e["type"] == "message.received"][-1]
    assert received["data"]["handoff"] is True and received["data"]["answered"] is False
    assert received["data"]["body"] == "I was charged twice"
    types = [e["type"] for e in receiver.delivered()]
    assert types.index("contact.handoff_started") > types.index("conversation.started")
    assert "conversation.cancelled" in types  # the welcome was cancelled
    # The agent answers through /notify, marked as an agent's message.
    agent_id = notify(events_app, to="+15551234567", body="Refunded, sorry!", agent="Maria")
    run_queue()
    assert bot_replies(twilio)[-1] == "Refunded, sorry!"
    with events_app.app_context():
        assert db.session.get(Message, agent_id).kind == "agent"
    # HELP works as always; release gives the contact back to the bot.
    post_webhook(events_app, inbound_form(body="HELP"))
    run_queue()
    assert "STOP" in bot_replies(twilio)[-1]
    assert client.delete("/contacts/+15551234567/handoff", headers=AUTH).get_json()["handoff"] is False
    post_webhook(events_app, inbound_form(body="hello"))
    run_queue()
    assert len(bot_replies(twilio)) == answered + 3  # the agent's, HELP's, and the bot's hello
    assert [e["type"] for e in receiver.delivered()].count("contact.handoff_ended") == 1


def test_stop_during_a_handoff_is_obeyed(events_app, receiver, twilio):
    with events_app.app_context():
        make_contact()
    events_app.test_client().post("/contacts/+15551234567/handoff", json={}, headers=AUTH)
    post_webhook(events_app, inbound_form(body="STOP"))
    run_queue()
    assert "unsubscribed" in bot_replies(twilio)[-1].lower()
    assert "contact.opted_out" in [e["type"] for e in receiver.delivered()]


def test_a_handoff_ends_by_itself(events_app, receiver, twilio):
    from bot.conversations import engine

    with events_app.app_context():
        make_contact()
    events_app.test_client().post("/contacts/+15551234567/handoff", json={"hours": 1}, headers=AUTH)
    with events_app.app_context():
        assert engine.expire_handoffs() == 0
        assert engine.expire_handoffs(now=utcnow() + timedelta(hours=2)) == 1
        assert db.session.scalar(sa.select(Contact.handoff_until)) is None
    run_queue()
    ended = [e for e in receiver.delivered() if e["type"] == "contact.handoff_ended"]
    assert len(ended) == 1 and ended[0]["data"]["by"] == "expiry"


def test_typing_agent_hands_over_with_a_template_reply(events_app, receiver, twilio):
    with events_app.app_context():
        make_contact()
    post_webhook(events_app, inbound_form(body="Agent"))
    run_queue()
    assert "a person from our team" in bot_replies(twilio)[-1]
    started = [e for e in receiver.delivered() if e["type"] == "contact.handoff_started"]
    assert len(started) == 1 and started[0]["data"]["by"] == "user"
    post_webhook(events_app, inbound_form(body="hello?"))
    run_queue()
    assert len(bot_replies(twilio)) == 1


def test_handoff_input_errors_are_clear(events_app):
    client = events_app.test_client()
    assert client.post("/contacts/+15551234567/handoff", json={"reason": 5}, headers=AUTH).status_code == 400
    assert client.post("/contacts/+15551234567/handoff", json={"hours": 0}, headers=AUTH).status_code == 400
    assert client.post("/contacts/+15551234567/handoff", json={"other": 1}, headers=AUTH).status_code == 400
    assert client.post("/contacts/not-a-phone/handoff", json={}, headers=AUTH).status_code == 400
    assert client.delete("/contacts/+15550000000/handoff", headers=AUTH).status_code == 404
    assert client.post("/contacts/+15551234567/handoff", json={}).status_code == 401


def test_after_a_failed_attempt_this_process_holds_back_instead_of_waiting_on_a_dead_receiver(events_app, receiver):
    """Deliveries of other contacts do not each wait out the same dead receiver: they are
    rescheduled for when the hold-back ends, with no attempt spent."""
    with events_app.app_context():
        first = make_contact(consent="unknown")
        second = make_contact("+15557654321", consent="unknown")
        change_consent(first, "opted_in", source="api")
        change_consent(second, "opted_in", source="api")
        db.session.commit()
        ids = [e.id for e in db.session.scalars(sa.select(Event).order_by(Event.seq))]
        huey.flush()
        receiver.answers = [500]
        event_delivery.HOLD_BACK = timedelta(seconds=30)  # monkeypatched back by the fixture
        assert event_delivery.deliver(ids[0]) == event_delivery.Outcome.RETRY
        assert event_delivery.deliver(ids[1]) == event_delivery.Outcome.BUSY
        assert db.session.get(Event, db.session.scalar(sa.select(Event.seq).where(Event.id == ids[1]))).attempts == 0
    assert len(receiver.verified) == 1


def test_development_mode_pushes_events_to_the_simulator_which_verifies_them(tmp_path):
    """No EVENTS_WEBHOOK_URL in development mode: events go to the bundled simulator, signed with
    a secret derived from the development auth token, and it verifies them as a receiver would."""
    import requests

    from bot.config import load_settings
    from bot.devmode import SIMULATOR_EVENTS_PATH, dev_events_secret, dev_secrets, simulator_url, with_dev_defaults
    from bot.devtools.simulator import TwilioSimulator

    settings = with_dev_defaults(load_settings({}, env_file=None), str(tmp_path))
    token = dev_secrets(str(tmp_path))["TWILIO_AUTH_TOKEN"]
    assert settings.events_webhook_url == simulator_url() + SIMULATOR_EVENTS_PATH
    assert settings.events_webhook_secret.get_secret_value() == dev_events_secret(token)

    event = Event(id="e" * 32, type="contact.opted_in", data={"contact": "+15551234567"}, created_at=utcnow())
    body, headers = event_delivery.signed_request(event, dev_events_secret(token))
    with TwilioSimulator("AC" + "0" * 32, token) as simulator:
        assert requests.post(simulator.url + SIMULATOR_EVENTS_PATH, data=body, headers=headers, timeout=5).status_code == 204
        forged = {**headers, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
        assert requests.post(simulator.url + SIMULATOR_EVENTS_PATH, data=body, headers=forged, timeout=5).status_code == 400
        [received] = simulator.events
    assert received["id"] == "e" * 32 and received["type"] == "contact.opted_in"


def test_a_flow_step_can_hand_over(events_app, receiver, twilio, monkeypatch):
    """A flow's step that says `handoff` ends its conversation and gives the contact to a person."""
    import flows
    from flows.toolkit import END, Flow, Reply, Step, keyword, route

    def ask_for_help(message, data):
        return Step(END, replies=(Reply("handoff/started", {"name": None}),), handoff="billing flow asked for a person")

    billing = Flow(name="billing", description="test flow", entry_points=(route(keyword("billing"), ask_for_help, to=END),),
                   states={})
    real_registry = flows.registry
    monkeypatch.setattr("bot.conversations.stages.registry", lambda: {**real_registry(), "billing": billing})
    with events_app.app_context():
        make_contact()
    post_webhook(events_app, inbound_form(body="billing"))
    run_queue()
    assert "a person from our team" in bot_replies(twilio)[-1]
    types = [e["type"] for e in receiver.delivered()]
    assert types.index("conversation.completed") < types.index("contact.handoff_started")
    started = next(e for e in receiver.delivered() if e["type"] == "contact.handoff_started")
    assert started["data"] == {**started["data"], "by": "flow", "reason": "billing flow asked for a person"}
    post_webhook(events_app, inbound_form(body="hello?"))
    run_queue()
    assert len(bot_replies(twilio)) == 1  # silent: a person answers now


def test_metadata_is_echoed_by_get_messages_and_flows_are_refused_during_a_handoff(events_app, receiver):
    client = events_app.test_client()
    with events_app.app_context():
        make_contact()
    message_id = notify(events_app, to="+15551234567", body="hi", metadata={"order_id": "A-17", "n": [1, 2]})
    assert client.get(f"/messages/{message_id}", headers=AUTH).get_json()["metadata"] == {"order_id": "A-17", "n": [1, 2]}
    too_big = client.post("/notify", json={"to": "+15551234567", "body": "hi", "metadata": {"x": "y" * 5000}},
                          headers=AUTH)
    assert too_big.status_code == 400 and "metadata" in too_big.get_json()["error"]
    assert client.post("/notify", json={"to": "+15551234567", "body": "hi", "metadata": [1]},
                       headers=AUTH).status_code == 400
    client.post("/contacts/+15551234567/handoff", json={}, headers=AUTH)
    flow = client.post("/notify", json={"to": "+15551234567", "flow": "feedback"}, headers=AUTH)
    assert flow.status_code == 409 and "handoff" in flow.get_json()["error"]


def test_old_delivered_events_are_pruned_failed_ones_kept(events_app):
    with events_app.app_context():
        contact = make_contact(consent="unknown")
        change_consent(contact, "opted_in", source="api")
        change_consent(contact, "opted_out", source="api")
        db.session.commit()
        old, failed = db.session.scalars(sa.select(Event).order_by(Event.seq)).all()
        old.status, old.created_at = "delivered", utcnow() - timedelta(days=31)
        failed.status, failed.created_at = "failed", utcnow() - timedelta(days=31)
        db.session.commit()
        assert event_delivery.prune() == 1
        assert db.session.scalars(sa.select(Event.status)).all() == ["failed"]


def test_figures_a_receiver_down_for_a_while_loses_nothing(events_app, receiver, twilio, record_property):
    """40 contacts, a notification each and Twilio's callbacks; the receiver answers 503 to its
    first 60 requests (down for a while), then recovers. Every event arrives, once per id when
    answered 2xx, in per-contact order."""
    phones = [f"+1555800{i:04d}" for i in range(40)]
    with events_app.app_context():
        for phone in phones:
            make_contact(phone)
    receiver.answers = [503] * 60
    for phone in phones:
        notify(events_app, to=phone, body="order shipped")
    run_queue(max_tasks=5000)  # every send, event and scheduled retry: hundreds of tasks
    rank = {"queued": 3, "sent": 5, "delivered": 6, "read": 7}
    moves = 0  # what the backend must hear: queued, then each callback that raised the rank
    shuffle = random.Random(9)  # the same shuffled orders on every run
    for message in twilio.messages:
        highest = rank["queued"]
        moves += 1
        for status in shuffle.sample(["sent", "delivered", "read", "sent"], 4):
            post_webhook(events_app, status_form(message["sid"], status, to=message["to"].removeprefix("whatsapp:")))
            if rank[status] > highest:
                highest, moves = rank[status], moves + 1
    run_queue(max_tasks=5000)
    rounds = 0
    while any(e.status == "pending" for e in stored_events(events_app)) and rounds < 10:
        retries_come_due(events_app, max_tasks=5000)
        rounds += 1
    stored = stored_events(events_app)
    delivered = receiver.delivered()
    ids = [e["id"] for e in delivered]
    by_contact: dict[str, list[int]] = {}
    seq_of = {e.id: e.seq for e in stored}
    for e in delivered:
        by_contact.setdefault(e["data"]["to"], []).append(seq_of[e["id"]])
    figures = {"events": len(stored), "delivered": len(set(ids)), "duplicated": len(ids) - len(set(ids)),
               "lost": len(stored) - len(set(ids)), "refused_attempts": 60, "rounds_of_retries": rounds,
               "attempts": sum(e.attempts for e in stored)}
    record_property("receiver_down", figures)
    print("receiver down for a while:", figures)
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert all(e.status == "delivered" for e in stored)
    assert all(seqs == sorted(seqs) for seqs in by_contact.values())  # per-contact order
    assert len(stored) == moves  # one event per transition, none for a repeat or a step back


def test_a_slow_receiver_holds_at_most_events_concurrency_threads(events_app, receiver):
    """While EVENTS_CONCURRENCY deliveries are talking to the receiver, another delivery task does
    not wait beside them: it ends, its event unclaimed and waiting in the database (no task
    re-enqueued), so the worker's threads stay free for sends and turns; the sweep (or a slot
    holder done with its own) takes it later."""
    with events_app.app_context():
        change_consent(make_contact(consent="unknown"), "opted_in", source="api")
        db.session.commit()
        [event_id] = db.session.scalars(sa.select(Event.id)).all()
        huey.flush()
        slots = event_delivery._delivery_slots()
        held = [slots.acquire(blocking=False) for _ in range(events_app.config["EVENTS_CONCURRENCY"])]
        try:
            assert all(held)
            assert event_delivery.deliver(event_id) == event_delivery.Outcome.BUSY
            assert db.session.scalar(sa.select(Event.attempts)) == 0 and huey.pending_count() + len(huey.scheduled()) == 0
        finally:
            for _ in held:
                slots.release()
    assert receiver.verified == []
    retries_come_due(events_app)
    assert [e["id"] for e in receiver.delivered()] == [event_id]
