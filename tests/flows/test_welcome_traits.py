"""What a flow declares about itself, as the engine honours it: the welcome runs on first contact,
asks for consent, yields to entry points — and an opted-in contact is never asked again."""
from __future__ import annotations

import sqlalchemy as sa

from bot.extensions import db
from bot.models import ConsentEvent
from bot.vocabulary import Consent, ConsentAction, ConversationStatus
from tests.conftest import make_contact, run_queue
from tests.conversations.test_conversations import PHONE, contact, conversations, ctx, ledger, say, templates  # noqa: F401


def test_consent_given_through_the_api_while_the_welcome_is_open_is_not_asked_for_again(ctx, client, auth, say):  # noqa: F811
    """The defect: an opted-in contact's YES got "Just reply YES" from a welcome still open."""
    make_contact(PHONE, consent=Consent.UNKNOWN)
    assert templates(say("hi")) == ["welcome/ask_consent"]
    assert client.put(f"/contacts/{PHONE}/consent", json={"consent": "opted_in"}, headers=auth).status_code == 200
    [welcome] = conversations()
    assert (welcome.status, welcome.outcome) == (ConversationStatus.COMPLETED, {"consent": "opted_in"})
    assert templates(say("YES")) == ["subscription/already_subscribed"]
    assert contact().consent == Consent.OPTED_IN


def test_a_no_from_an_opted_in_contact_is_no_decline(ctx, client, auth, say):  # noqa: F811
    """A welcome opened for a contact who is opted in meanwhile: "no" records no decline."""
    make_contact(PHONE, consent=Consent.UNKNOWN)
    say("hi")
    # Consent recorded behind the engine's back (a backend writing its own database, a migration):
    # the welcome is still open when the contact answers.
    db.session.execute(sa.text("UPDATE contacts SET consent = 'opted_in'"))
    db.session.commit()
    assert templates(say("no")) != ["welcome/declined"]
    assert [e.action for e in ledger()] == []
    assert contact().consent == Consent.OPTED_IN
    [welcome] = conversations()
    assert (welcome.status, welcome.outcome) == (ConversationStatus.COMPLETED, {"consent": "opted_in"})


def test_a_backend_started_welcome_for_an_opted_in_contact_asks_nothing(ctx, client, auth, twilio):  # noqa: F811
    make_contact(PHONE, consent=Consent.OPTED_IN)
    response = client.post("/notify", json={"to": PHONE, "flow": "welcome"}, headers=auth)
    assert response.status_code == 202
    run_queue()
    assert twilio.messages == []
    [welcome] = conversations()
    assert (welcome.status, welcome.outcome) == (ConversationStatus.COMPLETED, {"consent": "opted_in"})


def test_a_backend_started_welcome_for_an_unknown_contact_asks_and_yes_opts_in(ctx, client, auth, say):  # noqa: F811
    make_contact(PHONE, consent=Consent.UNKNOWN)
    assert client.post("/notify", json={"to": PHONE, "flow": "welcome"}, headers=auth).status_code == 202
    run_queue()
    [welcome] = conversations()
    assert welcome.status == ConversationStatus.ACTIVE
    assert templates(say("yes")) == ["subscription/opted_in"]
    assert contact().consent == Consent.OPTED_IN
    [welcome] = conversations()
    assert (welcome.status, welcome.outcome) == (ConversationStatus.COMPLETED, {"consent": "opted_in"})


def test_a_decline_in_the_welcome_is_recorded_and_consent_stays_unknown(ctx, say):  # noqa: F811
    make_contact(PHONE, consent=Consent.UNKNOWN)
    say("hi")
    assert templates(say("no thanks")) == ["welcome/declined"]
    assert [e.action for e in db.session.scalars(sa.select(ConsentEvent))] == [ConsentAction.DECLINED]
    assert contact().consent == Consent.UNKNOWN


def test_an_opted_in_contact_writing_first_is_not_welcomed(ctx, say):  # noqa: F811
    """Consent collected elsewhere before the first message: no consent question, a greeting."""
    make_contact(PHONE, consent=Consent.OPTED_IN)
    assert templates(say("hello")) == ["common/greeting"]
    assert conversations() == []
