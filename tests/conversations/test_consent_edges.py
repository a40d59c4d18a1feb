"""Consent at its edges: a STOP not yet processed, YES as an answer, sandbox joins, opt-out
buttons, declines, API opt-outs, and stale states of user-started flows."""
from __future__ import annotations

import sqlalchemy as sa

from bot.conversations import engine
from bot.channels.whatsapp.errors import OPTED_OUT_CODE
from bot.extensions import db
from bot.models import Consent, ConsentEvent, Contact, Conversation, Message
from bot.delivery.queue import huey
from tests.conftest import inbound_form, make_contact, run_queue
from tests.conversations.test_conversations import PHONE, contact, conversations, ctx, ledger, say, templates  # noqa: F401

SANDBOX = "whatsapp:+14155238886"


def test_a_stop_not_yet_processed_already_silences_notifications(ctx, client, auth, post_webhook, twilio):  # noqa: F811
    """The webhook stored STOP; the worker has not run it yet. Nothing else may get through."""
    make_contact(PHONE)
    queued = client.post("/notify", json={"to": PHONE, "body": "promo 1"}, headers=auth).get_json()["id"]
    send_task = huey.dequeue()  # promo 1 waits in the queue...
    assert post_webhook(inbound_form(PHONE, "Stop")).status_code == 200  # ...the user says STOP
    stop_task = huey.dequeue()
    # /notify after the STOP was stored, before it was processed: refused like an opted-out contact.
    late = client.post("/notify", json={"to": PHONE, "body": "promo 2"}, headers=auth)
    assert late.status_code == 409
    huey.execute(send_task)  # the worker reaches promo 1 before the STOP
    assert twilio.messages == []
    db.session.expire_all()
    row = db.session.get(Message, queued)
    assert (row.status, row.error_code) == ("failed", OPTED_OUT_CODE)
    assert "not yet processed" in row.error_message
    huey.execute(stop_task)
    run_queue()
    assert [m["body"] for m in twilio.messages] == [
        db.session.scalar(sa.select(Message.body).where(Message.template == "subscription/opted_out"))]
    assert contact().consent == Consent.OPTED_OUT


def test_a_button_press_labelled_stop_is_not_a_pending_opt_out(ctx, client, auth, post_webhook, twilio):  # noqa: F811
    make_contact(PHONE)
    post_webhook(inbound_form(PHONE, "Cancel", ButtonPayload="CANCEL", ButtonText="Cancel"))
    huey.flush()  # the press is stored, not processed
    assert client.post("/notify", json={"to": PHONE, "body": "still fine"}, headers=auth).status_code == 202


def test_yes_confirms_an_appointment_of_a_contact_whose_consent_is_unknown(ctx, client, auth, say):  # noqa: F811
    make_contact(PHONE, consent=Consent.UNKNOWN)
    response = client.post("/notify", headers=auth, json={
        "to": PHONE, "flow": "appointment", "variables": {"date": "Monday", "time": "08:00"}})
    conversation_id = response.get_json()["id"]
    run_queue()
    replies = say("Yes")
    assert "subscription/opted_in" not in templates(replies)
    body = client.get(f"/conversations/{conversation_id}", headers=auth).get_json()
    assert body["status"] == "completed" and body["outcome"]["answer"] == "confirmed"
    assert contact().consent == Consent.UNKNOWN and ledger() == []


def test_start_still_opts_in_during_a_flow_and_yes_does_when_the_flow_has_no_use_for_it(ctx, client, auth, say):  # noqa: F811
    make_contact(PHONE, consent=Consent.UNKNOWN)
    client.post("/notify", headers=auth, json={"to": PHONE, "flow": "feedback"})
    run_queue()
    assert templates(say("START")) == ["subscription/opted_in"]
    assert contact().consent == Consent.OPTED_IN


def test_yes_in_the_welcome_flow_opts_in(ctx, say):  # noqa: F811
    say("hello")
    assert templates(say("YES")) == ["subscription/opted_in"]
    assert contact().consent == Consent.OPTED_IN


def test_join_means_joining_only_on_the_sandbox_number(ctx, say):  # noqa: F811
    make_contact(PHONE, consent=Consent.OPTED_OUT)
    assert say("join us", To="whatsapp:+15550009999") == []  # our own sender: just text, ignored
    assert contact().consent == Consent.OPTED_OUT
    assert templates(say("join purple-elephant", To=SANDBOX)) == ["subscription/opted_in"]
    assert [(e.action, e.source) for e in ledger()] == [("opt_in", "sandbox_join")]


def test_an_opt_out_button_opts_out(ctx, say):  # noqa: F811
    make_contact(PHONE)
    replies = say("Stop promotions", ButtonPayload="STOP", ButtonText="Stop promotions", MessageType="button")
    assert templates(replies) == ["subscription/opted_out"]
    [event] = ledger()
    assert (event.action, event.source) == ("opt_out", "button")


def test_a_contact_who_declined_is_not_asked_again(ctx, say):  # noqa: F811
    say("hi")
    assert templates(say("no")) == ["welcome/declined"]
    assert templates(say("what are your opening hours?")) == ["common/not_understood"]
    assert [(e.action, e.previous) for e in ledger()] == [("declined", "unknown")]
    assert contact().consent == Consent.UNKNOWN
    assert templates(say("START")) == ["subscription/opted_in"]  # they can still change their mind


def test_api_opt_out_ends_open_conversations_completely(ctx, client, auth, say):  # noqa: F811
    make_contact(PHONE)
    say("feedback")
    [survey] = conversations()
    assert survey.status == "active" and survey.expires_at is not None
    response = client.put(f"/contacts/{PHONE}/consent", json={"consent": "opted_out"}, headers=auth)
    assert response.status_code == 200
    [survey] = conversations()
    assert (survey.status, survey.state) == ("cancelled", "END")
    assert survey.expires_at is None and survey.ended_at is not None
    assert engine.expire_conversations() == 0


def test_a_stale_state_of_a_user_started_flow_restarts_it(ctx, say):  # noqa: F811
    make_contact(PHONE)
    say("feedback")
    db.session.execute(sa.update(Conversation).values(state="a_state_removed_in_a_deploy"))
    db.session.commit()
    replies = say("4")
    assert templates(replies) == ["common/restarted", "feedback/ask_rating"]
    stale, fresh = conversations()
    assert stale.status == "failed"
    assert (fresh.flow, fresh.status, fresh.state, fresh.started_by) == ("feedback", "active", "rating", "user")
    assert templates(say("4"))[0].startswith("feedback/")  # the fresh survey takes the answer


def test_api_consent_rejects_nul_and_deep_nesting(ctx, client, auth):  # noqa: F811
    bad = client.put(f"/contacts/{PHONE}/consent", json={"consent": "opted_in", "note": "a\x00b"}, headers=auth)
    assert bad.status_code == 400 and "NUL" in bad.get_json()["error"]
    deep = client.put(f"/contacts/{PHONE}/consent", data="[" * 100000 + "]" * 100000,
                      content_type="application/json", headers=auth)
    assert deep.status_code == 400
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Contact)) == 0
    assert db.session.scalar(sa.select(sa.func.count()).select_from(ConsentEvent)) == 0


def test_yes_to_a_question_that_takes_any_text_opts_in_instead(ctx, client, auth, say):  # noqa: F811
    """A catch-all (a comment box, a re-ask) is no answer to YES: the contact is subscribing."""
    make_contact(PHONE, consent=Consent.UNKNOWN)
    client.post("/notify", headers=auth, json={"to": PHONE, "flow": "feedback"})
    run_queue()
    assert templates(say("YES")) == ["subscription/opted_in"]  # the rating question takes 1-5, not yes
    assert contact().consent == Consent.OPTED_IN
    [survey] = conversations()
    assert survey.status == "active" and survey.state == "rating"  # still waiting for its rating


def test_a_stop_is_obeyed_even_when_its_confirmation_cannot_be_built(ctx, say, twilio, monkeypatch):  # noqa: F811
    make_contact(PHONE)
    say("feedback")

    def broken(*args, **kwargs):
        raise RuntimeError("a typo in the confirmation's template")

    monkeypatch.setattr("bot.conversations.store.build_messages", broken)
    sent_before = len(twilio.messages)
    assert say("STOP") == []  # no apology either: after STOP only the confirmation may go
    assert contact().consent == Consent.OPTED_OUT
    [event] = ledger()
    assert (event.action, event.source) == ("opt_out", "keyword")
    assert [c.status for c in conversations()] == ["cancelled"]
    assert len(twilio.messages) == sent_before


def test_the_welcome_asks_once_and_hands_over_to_what_the_contact_starts(ctx, say):  # noqa: F811
    assert templates(say("no idea")) == ["welcome/ask_consent"]
    assert templates(say("feedback")) == ["feedback/ask_rating"]  # not swallowed by the welcome
    welcome, survey = conversations()
    assert (welcome.flow, welcome.status, welcome.outcome) == ("welcome", "completed", {"consent": "no_answer"})
    assert (survey.flow, survey.status) == ("feedback", "active")


def test_a_contact_talking_past_the_welcome_is_answered_and_not_asked_forever(ctx, say):  # noqa: F811
    assert templates(say("hi")) == ["welcome/ask_consent"]
    assert templates(say("where is my order")) == ["welcome/ask_again"]
    assert templates(say("hello??")) == ["common/not_understood"]  # answered, and the welcome ends
    assert templates(say("6")) == ["common/not_understood"]  # not a new welcome
    assert [c.flow for c in conversations()] == ["welcome"]
    assert contact().consent == Consent.UNKNOWN


def test_returning_subscribers_are_greeted_not_misunderstood(ctx, say):  # noqa: F811
    make_contact(PHONE)
    assert templates(say("Hello!")) == ["common/greeting"]
    assert templates(say("START")) == ["subscription/already_subscribed"]
    assert templates(say("yes")) == ["subscription/already_subscribed"]
    assert ledger() == []
