"""Development mode's way in: the terminal chat links a failed message to its timeline on the
dashboard (and `/timeline` links the bot's last message), and the link opens it."""
from __future__ import annotations

import sqlalchemy as sa

from bot.channels.whatsapp.client import build_client
from bot.devtools.chat import ChatSession, run_repl
from bot.extensions import db
from bot.models import Message
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, SENDER, make_contact, run_queue

PHONE = "+15551234567"


def typed(*lines: str):
    """What the user types, then Ctrl-D."""
    pending = list(lines)

    def read_line(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read_line


def test_the_chat_links_a_failed_message_to_its_timeline(app, client, auth, twilio, signed_in):
    chat = ChatSession(phone=PHONE, profile_name="Ada", webhook_url="http://127.0.0.1:5000/twilio/webhook",
                       auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, bot_number=SENDER,
                       client=build_client(ACCOUNT_SID, AUTH_TOKEN, twilio.url, 5))
    output: list[str] = []
    run_repl(chat, read_line=typed("/timeline"), write=output.append, watch_interval=None)
    assert "(the bot has sent you nothing yet)" in output

    with app.app_context():
        make_contact(PHONE)
    response = client.post("/notify", json={"to": PHONE, "body": "Your order shipped"}, headers=auth)
    message_id = response.get_json()["id"]
    run_queue()
    with app.app_context():
        sid = db.session.scalar(sa.select(Message.twilio_sid).where(Message.id == message_id))
    twilio.set_status(sid, "failed", error_code=63016)
    output.clear()
    run_repl(chat, read_line=typed("", "/timeline"), write=output.append, watch_interval=None)
    link = f"http://127.0.0.1:5000/dashboard/sid/{sid}"
    assert f"   ↳ why: {link}" in output, output
    assert f"   {link}" in output  # /timeline
    opened = signed_in.get(f"/dashboard/sid/{sid}")
    assert opened.headers["Location"].endswith(f"/dashboard/messages/{message_id}")
