"""The dashboard's message page and timeline say the locale the message's copy was resolved to."""
from __future__ import annotations


def test_a_messages_page_shows_its_locale(app, client, auth, twilio, signed_in):
    answer = client.put("/users/ana", json={"email": "ana@example.com", "name": "Ana", "locale": "pt-BR",
                                            "channels": ["email"]}, headers=auth)
    assert answer.status_code in (200, 201)
    sent = client.post("/notify", json={"user_id": "ana", "template": "login", "variables": {"device": "x"}},
                       headers=auth).get_json()
    page = signed_in.get(f"/dashboard/messages/{sent['id']}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "email · outbound · notification · pt-BR" in html
    assert "notification on email, in pt-BR" in html
