"""A handoff that lands while /notify is queueing a backend flow (issue 15, item 6).

/notify checks the handoff without the contact's lock, so a handoff committed between that check
and the conversation's commit finds no conversation to cancel. The worker checks again under the
lock: the flow never starts, and the backend hears why (conversation.cancelled).
"""
from __future__ import annotations

import sqlalchemy as sa

from bot.conversations.handoff import HANDED_OVER
from bot.extensions import db
from bot.http import notify as notify_route
from bot.models import Conversation, Event
from tests.conftest import make_contact, run_queue

PHONE = "+15551234567"


def test_a_handoff_committed_during_notify_keeps_the_backend_flow_from_starting(app, client, auth, twilio,
                                                                                 monkeypatch):
    with app.app_context():
        make_contact(PHONE)
    real_check = notify_route.in_handoff

    def check_then_a_person_takes_over(contact, *args, **kwargs):
        answer = real_check(contact, *args, **kwargs)
        # The backend's other request (an agent picking the contact up) commits right after the
        # check and before the conversation's commit: the race, made certain.
        response = app.test_client().post(f"/contacts/{PHONE}/handoff", json={"reason": "agent"}, headers=auth)
        assert response.status_code == 200 and response.get_json()["handoff"] is True
        return answer

    monkeypatch.setattr(notify_route, "in_handoff", check_then_a_person_takes_over)
    response = client.post("/notify", json={"to": PHONE, "flow": "feedback"}, headers=auth)
    assert response.status_code == 202 and response.get_json()["status"] == "starting"
    conversation_id = response.get_json()["id"]

    with app.app_context():
        run_queue()
        assert twilio.messages == []  # the bot wrote nothing to a contact a person is answering
        conversation = db.session.get(Conversation, conversation_id)
        assert (conversation.status, conversation.error) == ("cancelled", HANDED_OVER)
        cancelled = db.session.scalars(sa.select(Event).where(Event.type == "conversation.cancelled")).all()
        assert [(event.conversation_id, event.data["error"]) for event in cancelled] == [(conversation_id, HANDED_OVER)]
    # ...and the backend reads the same through the API.
    view = client.get(f"/conversations/{conversation_id}", headers=auth).get_json()
    assert view["status"] == "cancelled" and view["error"] == HANDED_OVER
