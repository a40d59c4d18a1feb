"""The conversation engine through signed webhooks and the queue: keywords, consent, flows."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.conversations import engine
from bot.clock import utcnow
from bot.extensions import db
from bot.models import Consent, ConsentEvent, Contact, Conversation, Message
from tests.conftest import CONTENT_SIDS, inbound_form, make_contact, run_queue

PHONE = "+15551234567"

OPT_OUT = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"]
OPT_IN = ["START", "YES", "UNSTOP"]
HELP = ["HELP", "INFO"]


def spellings(word: str) -> list[str]:
    return [word, word.lower(), word.capitalize(), f"  {word.lower()}  ", f"{word.title()}!", f" {word}. "]


@pytest.fixture
def say(post_webhook):
    """The user sends a WhatsApp message; the worker handles it. Returns the bot's new replies."""

    def send(text: str = "", phone: str = PHONE, **extra: str) -> list[Message]:
        form = inbound_form(phone, text, **extra)
        assert post_webhook(form).status_code == 200
        before = {m for m in db.session.scalars(sa.select(Message.id))}
        run_queue()
        db.session.expire_all()
        rows = db.session.scalars(sa.select(Message).where(Message.direction == "outbound")
                                  .order_by(Message.created_at)).all()
        return [m for m in rows if m.id not in before]

    return send


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield


def contact() -> Contact:
    db.session.expire_all()
    return db.session.scalar(sa.select(Contact).where(Contact.phone == PHONE))


def ledger() -> list[ConsentEvent]:
    return list(db.session.scalars(sa.select(ConsentEvent).order_by(ConsentEvent.id)))


def conversations() -> list[Conversation]:
    db.session.expire_all()
    return list(db.session.scalars(sa.select(Conversation).order_by(Conversation.started_at)))


def templates(rows: list[Message]) -> list[str]:
    return [row.template for row in rows]


# --- the keyword table --------------------------------------------------------------------

@pytest.mark.parametrize("text", [s for word in OPT_OUT for s in spellings(word)])
def test_every_opt_out_keyword_opts_out_with_one_confirmation(ctx, say, twilio, text):
    make_contact(PHONE)
    replies = say(text)
    assert templates(replies) == ["subscription/opted_out"]
    assert contact().consent == Consent.OPTED_OUT
    [event] = ledger()
    assert (event.action, event.source, event.words, event.previous) == ("opt_out", "keyword", text, "opted_in")
    assert event.message_sid and event.message_sid.startswith("SM")
    assert len(twilio.messages) == 1  # the confirmation went out
    # A second STOP, or anything else, gets nothing back.
    assert say(text) == [] and say("hello?") == []
    assert len(ledger()) == 1


@pytest.mark.parametrize("text", [s for word in OPT_IN for s in spellings(word)])
def test_every_opt_in_keyword_opts_back_in(ctx, say, text):
    make_contact(PHONE, consent=Consent.OPTED_OUT)
    replies = say(text)
    assert templates(replies) == ["subscription/opted_in"]
    assert contact().consent == Consent.OPTED_IN
    [event] = ledger()
    assert (event.action, event.source, event.previous) == ("opt_in", "keyword", "opted_out")


@pytest.mark.parametrize("text", [s for word in HELP for s in spellings(word)])
def test_help_keywords_answer_help(ctx, say, text):
    make_contact(PHONE)
    assert templates(say(text)) == ["common/help"]
    assert ledger() == [] and contact().consent == Consent.OPTED_IN


@pytest.mark.parametrize("text", ["stop it please", "don't stop", "start over?", "helpful"])
def test_keywords_must_be_the_whole_message(ctx, say, text):
    make_contact(PHONE)
    assert "subscription/opted_out" not in templates(say(text))
    assert contact().consent == Consent.OPTED_IN


def test_keyword_lists_are_configurable_for_other_languages(base_config, _schema, twilio, post_webhook):
    from bot import create_app
    from tests.conftest import in_process_queue_options, signed_headers, PUBLIC_BASE, WEBHOOK_URL

    app = create_app({**base_config, "TESTING": True, "OPT_OUT_KEYWORDS": "STOP,ALTO,ARRÊT",
                      "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    with app.app_context():
        make_contact(PHONE)
        form = inbound_form(PHONE, "  arrêt ")
        client = app.test_client()
        assert client.post("/twilio/webhook", data=form, headers=signed_headers(WEBHOOK_URL, form),
                           base_url=PUBLIC_BASE).status_code == 200
        run_queue()
        assert contact().consent == Consent.OPTED_OUT
        db.engine.dispose()


def test_twilio_advanced_opt_out_field_is_obeyed(ctx, say):
    make_contact(PHONE)
    say("please remove me", OptOutType="STOP")
    assert contact().consent == Consent.OPTED_OUT
    assert ledger()[0].source == "twilio_opt_out"


# --- new contacts, welcome and the sandbox ----------------------------------------------------

def test_new_contact_is_welcomed_and_asked_to_opt_in(ctx, say):
    replies = say("hi there")
    assert templates(replies) == ["welcome/ask_consent"]
    assert "Ada" in replies[0].body  # the WhatsApp profile name
    assert contact().consent == Consent.UNKNOWN
    [welcome] = conversations()
    assert (welcome.flow, welcome.state, welcome.status) == ("welcome", "awaiting_consent", "active")

    assert templates(say("Yes!")) == ["subscription/opted_in"]
    assert contact().consent == Consent.OPTED_IN
    [welcome] = conversations()
    assert (welcome.status, welcome.outcome) == ("completed", {"consent": "opted_in"})
    assert [(e.action, e.source) for e in ledger()] == [("opt_in", "keyword")]


def test_new_contact_can_decline(ctx, say):
    say("hello")
    assert templates(say("No thanks")) == ["welcome/declined"]
    assert contact().consent == Consent.UNKNOWN
    assert conversations()[0].outcome == {"consent": "declined"}


def test_sandbox_join_counts_as_opt_in(ctx, say):
    replies = say("join purple-elephant")
    assert templates(replies) == ["subscription/opted_in"]
    assert contact().consent == Consent.OPTED_IN
    assert [(e.source, e.words) for e in ledger()] == [("sandbox_join", "join purple-elephant")]


# --- opt-out is enforced on every send route (invariant 4) --------------------------------------

def test_opt_out_silences_queued_notifications_replies_and_retries(ctx, client, auth, say, twilio):
    make_contact(PHONE)
    # A notification queued before STOP, and one failing transiently (to be retried after STOP).
    queued = client.post("/notify", json={"to": PHONE, "body": "promo 1"}, headers=auth).get_json()["id"]
    twilio.fail_next(503, 20503, "busy")
    retried = client.post("/notify", json={"to": PHONE, "body": "promo 2"}, headers=auth).get_json()["id"]
    from bot.delivery.queue import huey
    task = huey.dequeue()  # promo 1's task is taken by a worker that stalls; promo 2 fails once
    second = huey.dequeue()
    huey.execute(second)
    replies = say("STOP")  # meanwhile the user opts out; the queue runs (retries included)
    huey.execute(task)
    run_queue()
    assert templates(replies) == ["subscription/opted_out"]
    bodies = [m["body"] for m in twilio.messages]
    assert bodies == [replies[0].body]  # the confirmation, nothing else
    db.session.expire_all()  # promo 2 waited behind promo 1 (per-contact order): read it afresh
    for message_id in (queued, retried):
        row = db.session.get(Message, message_id)
        assert (row.status, row.error_code) == ("failed", 21610)
    # Nothing new either: notifications, templates and flows are refused up front.
    assert client.post("/notify", json={"to": PHONE, "body": "x"}, headers=auth).status_code == 409
    assert client.post("/notify", json={"to": PHONE, "template": "order_update"}, headers=auth).status_code == 409
    assert client.post("/notify", json={"to": PHONE, "flow": "feedback"}, headers=auth).status_code == 409
    assert say("feedback") == []
    assert len(twilio.messages) == 1


def test_opt_out_committed_before_the_confirmation_is_enqueued(ctx, say, database_url):
    from huey import signals
    from bot.delivery.queue import huey

    make_contact(PHONE)
    seen = []
    engine_ = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))

    @huey.signal(signals.SIGNAL_ENQUEUED)
    def look(signal, task):
        if task.name.endswith("send_message"):
            with engine_.connect() as conn:
                seen.append(conn.execute(sa.text("SELECT consent FROM contacts")).scalar())

    try:
        say("STOP")
    finally:
        huey.disconnect_signal(look)
        engine_.dispose()
    assert seen == ["opted_out"]


def test_api_consent_is_recorded_in_the_ledger(ctx, client, auth):
    response = client.put(f"/contacts/{PHONE}/consent", json={"consent": "opted_in", "note": "web signup form"},
                          headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["consent"] == "opted_in"
    assert [(e["action"], e["source"], e["words"]) for e in body["consent_history"]] == \
        [("opt_in", "api", "web signup form")]
    assert client.put(f"/contacts/{PHONE}/consent", json={"consent": "maybe"}, headers=auth).status_code == 400
    assert client.get("/contacts/not-a-phone", headers=auth).status_code == 400
    assert client.get("/contacts/+15550000000", headers=auth).status_code == 404


# --- one contact, one turn at a time (invariant 6) ----------------------------------------------

def test_messages_of_one_contact_are_handled_in_arrival_order(ctx, post_webhook):
    make_contact(PHONE)
    first, second = inbound_form(PHONE, "feedback"), inbound_form(PHONE, "4")
    post_webhook(first)
    post_webhook(second)
    from bot.delivery.queue import huey
    huey.flush()
    ids = {form["Body"]: db.session.scalar(sa.select(Message.id).where(Message.twilio_sid == form["MessageSid"]))
           for form in (first, second)}
    # The task of the second message runs first: it must handle the first message before itself.
    engine.process_inbound(ids["4"])
    engine.process_inbound(ids["feedback"])
    [survey] = conversations()
    assert survey.flow == "feedback" and survey.data.get("rating") == 4
    statuses = db.session.scalars(sa.select(Message.status).where(Message.direction == "inbound")).all()
    assert statuses == ["processed", "processed"]


def test_two_messages_arriving_together_are_never_processed_concurrently(app, post_webhook):
    with app.app_context():
        make_contact(PHONE)
    forms = [inbound_form(PHONE, "feedback"), inbound_form(PHONE, "5"), inbound_form(PHONE, "Great service")]
    for form in forms:
        post_webhook(form)
    from bot.delivery.queue import huey
    huey.flush()
    with app.app_context():
        ids = [db.session.scalar(sa.select(Message.id).where(Message.twilio_sid == f["MessageSid"])) for f in forms]
    errors: list[BaseException] = []

    def work(message_id: str) -> None:
        try:
            with app.app_context():
                engine.process_inbound(message_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(mid,)) for mid in reversed(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with app.app_context():
        [survey] = conversations()
        assert survey.status == "completed"
        assert survey.outcome["rating"] == 5 and survey.outcome["comment"] == "Great service"


def test_other_contacts_are_not_blocked_by_a_busy_one(app, post_webhook, database_url):
    if not database_url.startswith("postgres"):
        pytest.skip("SQLite has one write lock for the whole database; per-row locks need PostgreSQL")
    with app.app_context():
        busy = make_contact("+15550001111")
        make_contact(PHONE)
        busy_id = busy.id
    post_webhook(inbound_form(PHONE, "help"))
    from bot.delivery.queue import huey
    huey.flush()
    other = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with other.connect() as conn:
        conn.execute(sa.text("UPDATE contacts SET updated_at = updated_at WHERE id = :id"), {"id": busy_id})
        # The busy contact's row stays locked by this open transaction while we handle PHONE.
        with app.app_context():
            message_id = db.session.scalar(sa.select(Message.id).where(Message.direction == "inbound"))
            engine.process_inbound(message_id)
            assert db.session.get(Message, message_id).status == "processed"
        conn.rollback()
    other.dispose()


# --- flows started by the backend, outcomes through the API -------------------------------------

def test_backend_started_appointment_confirmed_by_button(ctx, client, auth, say, twilio):
    make_contact(PHONE)
    response = client.post("/notify", headers=auth, json={
        "to": PHONE, "flow": "appointment",
        "variables": {"name": "Ada", "date": "Tuesday 3 March", "time": "10:30", "appointment_id": "A-17"}})
    assert response.status_code == 202, response.get_json()
    conversation_id = response.get_json()["id"]
    assert response.get_json()["status"] == "starting"
    run_queue()
    [reminder] = twilio.messages
    assert "10:30" in reminder["body"]
    say("", ButtonPayload="CONFIRM", ButtonText="Confirm", MessageType="button")
    body = client.get(f"/conversations/{conversation_id}", headers=auth).get_json()
    assert body["status"] == "completed"
    assert body["outcome"]["answer"] == "confirmed"
    assert body["outcome"].get("appointment_id") == "A-17"
    contact_view = client.get(f"/contacts/{PHONE}", headers=auth).get_json()
    assert contact_view["conversations"][0]["outcome"]["answer"] == "confirmed"


def test_backend_flow_validation(ctx, client, auth):
    make_contact(PHONE)
    cases = [
        ({"flow": "nope"}, "unknown flow"),
        ({"flow": "appointment", "variables": {"time": "10:00"}}, "date"),
        ({"flow": "appointment", "variables": "x"}, "variables"),
        ({"flow": "appointment", "body": "hi"}, "not both"),
    ]
    for payload, words in cases:
        response = client.post("/notify", json={"to": PHONE, **payload}, headers=auth)
        assert response.status_code == 400 and words in response.get_json()["error"], payload


def test_backend_flow_outside_the_window_needs_its_template(ctx, client, auth, app, twilio):
    make_contact(PHONE, inbound_ago=timedelta(days=3))
    payload = {"to": PHONE, "flow": "appointment", "variables": {"date": "Friday", "time": "09:00"}}
    response = client.post("/notify", json=payload, headers=auth)
    assert response.status_code == 422 and "appointment_reminder" in response.get_json()["error"]
    app.config["TWILIO_CONTENT_SIDS"] = {**CONTENT_SIDS, "appointment_reminder": "HX" + "c3" * 16}
    assert client.post("/notify", json=payload, headers=auth).status_code == 202
    run_queue()
    [sent] = twilio.messages
    assert sent["form"]["ContentSid"] == "HX" + "c3" * 16


def test_timeout_nudge_outside_the_window_is_skipped_and_recorded(ctx, client, auth, say, twilio):
    make_contact(PHONE)
    client.post("/notify", headers=auth, json={"to": PHONE, "flow": "appointment",
                                               "variables": {"date": "Monday", "time": "08:00"}})
    run_queue()
    twilio.reset()
    # Two days pass without an answer: the window is closed when the timeout nudge is due.
    db.session.execute(sa.update(Contact).values(last_inbound_at=utcnow() - timedelta(days=2)))
    db.session.commit()
    assert engine.expire_conversations(now=utcnow() + timedelta(days=2)) == 1
    run_queue()
    assert twilio.requests == []  # never sent to fail with 63016
    [appointment] = conversations()
    assert appointment.status == "expired" and appointment.outcome["answer"] == "no_response"
    nudge = db.session.scalar(sa.select(Message).where(Message.conversation_id == appointment.id)
                              .order_by(Message.created_at.desc()).limit(1))
    assert (nudge.status, nudge.error_code) == ("failed", 63016)
    assert "skipped" in nudge.error_message


def test_timeout_nudge_outside_the_window_uses_its_approved_template(ctx, app, client, auth, twilio):
    app.config["TWILIO_CONTENT_SIDS"] = {**CONTENT_SIDS, "appointment_no_response": "HX" + "d4" * 16}
    make_contact(PHONE)
    client.post("/notify", headers=auth, json={"to": PHONE, "flow": "appointment",
                                               "variables": {"date": "Monday", "time": "08:00"}})
    run_queue()
    twilio.reset()
    db.session.execute(sa.update(Contact).values(last_inbound_at=utcnow() - timedelta(days=2)))
    db.session.commit()
    engine.expire_conversations(now=utcnow() + timedelta(days=2))
    run_queue()
    [sent] = twilio.messages
    assert sent["form"]["ContentSid"] == "HX" + "d4" * 16


def test_user_text_is_never_template_source(ctx, say):
    make_contact(PHONE)
    say("feedback")
    say("4")
    replies = say("{{ 7 * 7 }} {% raw %}")
    assert all("49" not in row.body for row in replies)
    [survey] = conversations()
    assert survey.outcome["comment"] == "{{ 7 * 7 }} {% raw %}"


# --- timeouts, restarts, stale states, failing handlers ----------------------------------------

def test_timeout_fires_after_a_restart(base_config, _schema, app, post_webhook):
    with app.app_context():
        make_contact(PHONE)
    post_webhook(inbound_form(PHONE, "feedback"))
    run_queue()
    # A new process (the worker restarted): nothing in memory survives, the database has it all.
    from bot import create_app
    from tests.conftest import in_process_queue_options

    restarted = create_app({**base_config, "TESTING": True,
                            "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    with restarted.app_context():
        assert engine.expire_conversations() == 0  # not yet idle long enough
        assert engine.expire_conversations(now=utcnow() + timedelta(hours=2)) == 1
        [survey] = conversations()
        assert survey.status == "expired" and survey.ended_at is not None
        db.engine.dispose()


def test_stale_state_restarts_the_flow(ctx, client, auth, say):
    make_contact(PHONE)
    client.post("/notify", headers=auth, json={"to": PHONE, "flow": "appointment",
                                               "variables": {"date": "Monday", "time": "08:00"}})
    run_queue()
    db.session.execute(sa.update(Conversation).values(state="a_state_removed_in_a_deploy"))
    db.session.commit()
    replies = say("whatever")
    assert templates(replies)[0] == "common/restarted"
    stale, fresh = conversations()
    assert stale.status == "failed" and "restarted" in stale.error
    assert fresh.status == "active" and fresh.flow == "appointment" and fresh.variables["date"] == "Monday"


def test_a_failing_handler_apologises_and_does_not_wedge_the_contact(ctx, say, monkeypatch):
    from flows import feedback

    make_contact(PHONE)
    say("feedback")

    def broken(message, data):
        raise RuntimeError("bug in the flow")

    routes = {state: tuple(r.__class__(r.matcher, broken, r.label, r.to) for r in rs)
              for state, rs in feedback.flow.states.items()}
    import dataclasses
    import flows
    broken_flow = dataclasses.replace(feedback.flow, states=routes, fallbacks=())
    real_registry = flows.registry
    monkeypatch.setattr("bot.conversations.stages.registry", lambda: {**real_registry(), "feedback": broken_flow})
    replies = say("3")
    assert templates(replies) == ["common/error"]
    inbound = db.session.scalars(sa.select(Message).where(Message.direction == "inbound")
                                 .order_by(Message.created_at)).all()
    assert inbound[-1].status == "processed" and "RuntimeError" in inbound[-1].error_message
    [survey] = conversations()
    assert survey.status == "failed"
    monkeypatch.setattr("bot.conversations.stages.registry", real_registry)
    assert templates(say("help")) == ["common/help"]  # the contact is not stuck


def test_a_flow_failing_after_it_started_a_conversation_leaves_none_of_its_writes(ctx, say, monkeypatch):
    """The turn writes nothing before its commit (no savepoint: docs/ARCHITECTURE.md, "Inbound"):
    a flow that fails after its entry point opened a conversation, and reported it, leaves
    neither behind; the message is processed with an apology. Data that is not JSON is such a
    failure, found before the commit rather than at its flush."""
    import dataclasses

    import flows
    from bot.models import Event
    from flows import feedback
    from flows.toolkit import Step

    make_contact(PHONE)

    def unstorable(message, data):
        return Step(feedback.RATING, data={"seen": {1, 2}})  # a set: not JSON

    entry = tuple(dataclasses.replace(r, handler=unstorable) for r in feedback.flow.entry_points)
    real_registry = flows.registry
    monkeypatch.setattr("bot.conversations.stages.registry",
                        lambda: {**real_registry(), "feedback": dataclasses.replace(feedback.flow, entry_points=entry)})
    replies = say("feedback")
    assert templates(replies) == ["common/error"]
    db.session.expire_all()
    [inbound] = db.session.scalars(sa.select(Message).where(Message.direction == "inbound")).all()
    assert inbound.status == "processed" and "TypeError" in inbound.error_message
    assert conversations() == []  # the conversation its entry point opened was never written
    kinds = [e.type for e in db.session.scalars(sa.select(Event).order_by(Event.seq))]
    assert "conversation.started" not in kinds and kinds.count("message.received") == 1
    received = db.session.scalar(sa.select(Event).where(Event.type == "message.received"))
    assert received.data["conversation_id"] is None and received.data["answered"] is True

    monkeypatch.setattr("bot.conversations.stages.registry", real_registry)
    assert templates(say("feedback"))[0].startswith("feedback/")  # the contact is not stuck


def test_inbound_content_reaches_flows(ctx):
    from flows.toolkit import Inbound

    form = inbound_form(PHONE, "", NumMedia="1", MediaUrl0="https://m/0", MediaContentType0="image/png",
                        Latitude="52.52", Longitude="13.40", Address="Berlin", ButtonPayload="CONFIRM",
                        ButtonText="Confirm")
    message = Inbound.from_twilio(form)
    assert message.media[0].url == "https://m/0" and message.media[0].content_type == "image/png"
    assert message.location.latitude == 52.52 and message.location.address == "Berlin"
    assert message.button_payload == "CONFIRM" and message.answer == "confirm"
    assert message.profile_name == "Ada" and message.wa_id == "15551234567"


def test_a_button_labelled_like_a_keyword_answers_the_flow_not_the_keyword(ctx, client, auth, say):
    make_contact(PHONE)
    client.post("/notify", headers=auth, json={"to": PHONE, "flow": "appointment",
                                               "variables": {"date": "Monday", "time": "08:00"}})
    run_queue()
    say("Cancel", ButtonPayload="CANCEL", ButtonText="Cancel")
    assert contact().consent == Consent.OPTED_IN  # not unsubscribed
    [appointment] = conversations()
    assert appointment.outcome["answer"] == "cancelled"


def test_blank_required_flow_variables_are_a_400(ctx, client, auth):
    make_contact(PHONE)
    response = client.post("/notify", headers=auth, json={"to": PHONE, "flow": "appointment",
                                                          "variables": {"date": "   ", "time": "08:00"}})
    assert response.status_code == 400 and "date" in response.get_json()["error"]
