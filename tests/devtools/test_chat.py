"""`flask chat`: the chat core, the REPL and the command, against real web + worker processes."""
from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from bot.devtools.chat import ChatError, ChatEvent, ChatSession, chat_command, run_repl, ticks
from bot.extensions import db
from bot.models import Contact, Message
from bot.channels.whatsapp.client import build_client
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, SENDER
from tests.faults.test_processes import free_port, stack, wait_until  # noqa: F401  (stack is a fixture)


def session_for(stack, phone: str, name: str | None = "Ada", auth_token: str = AUTH_TOKEN) -> ChatSession:  # noqa: F811
    return ChatSession(
        phone=phone, profile_name=name, webhook_url=stack["base"] + "/twilio/webhook", auth_token=auth_token,
        account_sid=ACCOUNT_SID, bot_number=SENDER,
        client=build_client(ACCOUNT_SID, AUTH_TOKEN, stack["simulator"].url, 5),
    )


def messages_of(events: list[ChatEvent]) -> list[ChatEvent]:
    return [e for e in events if e.kind == "message"]


def inbound_rows(app, phone: str) -> list[tuple[str, dict]]:
    """(status, payload) of the contact's inbound messages, oldest first."""
    with app.app_context():
        db.session.remove()
        rows = db.session.execute(
            sa.select(Message.status, Message.payload).join(Contact, Contact.id == Message.contact_id)
            .where(Contact.phone == phone, Message.direction == "inbound")
            .order_by(Message.created_at, Message.id)
        ).all()
        return [(status, payload) for status, payload in rows]


# --- pure -----------------------------------------------------------------------------------------

def test_ticks_and_rendering_look_like_whatsapp():
    assert [ticks(s) for s in ("queued", "accepted", "sending", "sent", "delivered", "read")] == \
        ["🕓", "🕓", "🕓", "✓", "✓✓", "✓✓ (read)"]
    assert ticks("undelivered", 30003) == "✗ 30003" and ticks("failed", 63016) == "✗ 63016"
    assert ChatEvent("message", "SM1", "delivered", "Thanks! You are subscribed.").render() == \
        "bot: Thanks! You are subscribed. ✓✓"
    assert ChatEvent("status", "SM1", "read").render() == "   ↳ read ✓✓"
    assert ChatEvent("status", "SM1", "undelivered", error_code=30003).render() == "   ↳ undelivered ✗ 30003"
    # A multi-line body stays readable: continuation lines are indented under the first.
    assert ChatEvent("message", "SM2", "sent", "Hi!\nReply YES").render() == "bot: Hi!\n     Reply YES ✓"


# --- the core against the real processes ----------------------------------------------------------

def test_a_whole_conversation_through_the_chat_core(stack, app):  # noqa: F811
    phone = "+15551230101"
    chat = session_for(stack, phone)
    seen: list[ChatEvent] = []

    def say(text: str | None = None, *, button: str | None = None) -> ChatEvent:
        chat.button(button) if button is not None else chat.send(text)
        events = chat.wait_for(1, timeout=20)
        seen.extend(events)
        [reply] = messages_of(events)
        return reply

    welcome = say("hi")
    assert "Hi Ada!" in welcome.body and "Reply YES" in welcome.body
    assert welcome.render().startswith("bot: Hi Ada!")
    assert "You are subscribed" in say("yes").body
    assert "Please rate us from 1 (poor) to 5 (excellent)" in say("feedback").body
    rated = say(button="5")
    assert "Thanks for the 5/5" in rated.body and "What did you like most?" in rated.body
    assert "Thank you for your feedback" in say("Lovely").body

    # The button press was posted as WhatsApp posts a quick reply.
    payloads = [payload for _, payload in inbound_rows(app, phone)]
    button = next(p for p in payloads if p.get("MessageType") == "button")
    assert button["ButtonPayload"] == "5" and button["ButtonText"] == "5" and button["Body"] == "5"
    assert button["ProfileName"] == "Ada" and button["WaId"] == "15551230101"
    assert button["From"] == "whatsapp:" + phone and button["To"] == SENDER

    # STOP: exactly one confirmation, then silence.
    chat.send("STOP")
    stop_events = chat.wait_for(1, timeout=20)
    seen.extend(stop_events)
    [confirmation] = messages_of(stop_events)
    assert "You are unsubscribed" in confirmation.body
    chat.send("are you still there?")
    wait_until(lambda: [s for s, _ in inbound_rows(app, phone)] == ["processed"] * 7,
               what="all seven inbound messages to be handled")
    time.sleep(1.0)  # a reply, if the worker (wrongly) sent one, would reach the simulator by now
    late = chat.poll()
    seen.extend(late)
    assert messages_of(late) == []
    sent_to_phone = [m for m in stack["simulator"].messages if m["to"] == "whatsapp:" + phone]
    assert len(sent_to_phone) == 6  # welcome, subscribed, rating question, comment question, thanks, STOP

    # Ticks: every reply moves on to read; status events say so.
    if not any(e.kind == "status" and e.status == "read" for e in seen):
        seen.extend(chat.wait_for(lambda events: any(e.status == "read" for e in events), timeout=10))
    read = [e for e in seen if e.kind == "status" and e.status == "read"]
    assert read and read[0].render() == "   ↳ read ✓✓"
    assert {e.sid for e in messages_of(seen)} == {m["sid"] for m in sent_to_phone}


def test_the_repl_shows_replies_ticks_and_handles_commands(stack, app):  # noqa: F811
    phone = "+15551230202"
    chat = session_for(stack, phone, name="Grace")
    lines = ["/help", "hi", "yes", "/nope", "/button", "/location north south", "feedback",
             "/button 4 Four stars", "/location 51.5034 -0.1276 10 Downing Street, London",
             "/media https://example.com/cat.png", "Lovely", "feedback", "/wait", "/events 50", "/events x",
             "/quit", "never sent"]
    output: list[str] = []

    def read_line(prompt: str) -> str:
        assert prompt  # called like input()
        if not lines:
            raise EOFError
        return lines.pop(0)

    with app.app_context():  # /wait runs the engine, as `flask chat` does inside its app context
        run_repl(chat, read_line=read_line, write=output.append, poll_interval=0.1, reply_timeout=4, settle=0.5)
    text = "\n".join(output)

    assert lines == ["never sent"], "/quit must stop reading"
    assert text.count("An empty line checks for new messages") == 2  # /help, and /nope
    assert "/location LAT LON" in text and "/media URL" in text and "/wait" in text and "/quit" in text
    assert "unknown command /nope" in text
    assert "usage: /button PAYLOAD" in text and "usage: /location LAT LON" in text

    assert "bot: Hi Grace!" in text and "You are subscribed" in text
    assert "Please rate us" in text and "Thanks for the 4/5" in text
    assert "you: [button] Four stars (payload 4)" in text
    assert text.count("I can only read text") == 2  # the location and the picture are not a comment
    assert "Thank you for your feedback" in text
    assert "(1 conversation timed out)" in text
    # /events: what the typing caused for the backend, read from the server's database.
    assert "contact.opted_in" in text and "conversation.completed" in text and "message.received" in text
    assert "usage: /events [N]" in text
    # Ticks: replies carry one, and status lines follow them.
    bot_lines = [line for line in output if line.startswith("bot: ")]
    assert len(bot_lines) == 8
    assert all(line.rstrip().endswith(("🕓", "✓", "✓✓", "✓✓ (read)")) for line in bot_lines)
    assert any(line.startswith("   ↳ ") and "✓" in line for line in output)

    payloads = [payload for _, payload in inbound_rows(app, phone)]
    location = next(p for p in payloads if p.get("MessageType") == "location")
    assert (location["Latitude"], location["Longitude"]) == ("51.5034", "-0.1276")
    assert location["Address"] == "10 Downing Street, London"
    picture = next(p for p in payloads if p.get("MessageType") == "image")
    assert picture["NumMedia"] == "1" and picture["MediaUrl0"] == "https://example.com/cat.png"
    assert picture["MediaContentType0"] == "image/png"
    assert "never sent" not in [p["Body"] for p in payloads]
    with app.app_context():
        db.session.remove()
        assert chat.expire_timeouts() == 0  # the survey already timed out


def test_a_refused_signature_is_a_clear_error_without_the_token(stack):  # noqa: F811
    chat = session_for(stack, "+15551230303", auth_token="wrong")
    with pytest.raises(ChatError) as caught:
        chat.send("hi")
    message = str(caught.value)
    assert "403" in message and stack["base"] + "/twilio/webhook" in message
    assert AUTH_TOKEN not in message and "wrong" not in message


# --- without the processes -------------------------------------------------------------------------

def test_an_unreachable_server_is_a_clear_error(twilio):
    url = f"http://127.0.0.1:{free_port()}/twilio/webhook"
    chat = ChatSession(phone="+15551230404", profile_name=None, webhook_url=url, auth_token=AUTH_TOKEN,
                       account_sid=ACCOUNT_SID, bot_number=SENDER,
                       client=build_client(ACCOUNT_SID, AUTH_TOKEN, twilio.url, 5))
    with pytest.raises(ChatError, match="cannot reach the bot at " + url) as caught:
        chat.send("hi")
    assert AUTH_TOKEN not in str(caught.value)


def test_messages_from_before_the_session_are_not_shown(app, twilio):
    client = build_client(ACCOUNT_SID, AUTH_TOKEN, twilio.url, 5)
    to = "whatsapp:+15551230505"
    client.messages.create(to=to, from_=SENDER, body="old news")
    client.messages.create(to="whatsapp:+15551230000", from_=SENDER, body="for someone else")
    with app.app_context():
        chat = ChatSession.from_app(None, "+15551230505", "Ada")
        assert chat.webhook_url == app.config["TWILIO_WEBHOOK_URL"] and chat.bot_number == SENDER
        client.messages.create(to=to, from_=SENDER, body="fresh")
        [event] = chat.poll()
        assert (event.kind, event.body, event.status) == ("message", "fresh", "queued")
        assert event.render() == "bot: fresh 🕓"
        assert chat.poll() == []
        assert chat.expire_timeouts() == 0  # no such contact yet: nothing to expire
    with pytest.raises(ChatError, match="expected 1 bot message"):
        chat.wait_for(1, timeout=0.3)


def test_the_command_refuses_a_bad_phone_number(app):
    result = app.test_cli_runner().invoke(chat_command, ["--as", "not-a-number"])
    assert result.exit_code != 0
    assert "phone number" in result.output and "--as" in result.output


def test_the_command_prints_who_you_are_and_the_commands(app):
    result = app.test_cli_runner().invoke(chat_command, ["--as", "0044 20 7946 0958", "--name", "Ada"],
                                          input="/help\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "You are Ada (+442079460958)" in result.output
    assert app.config["TWILIO_WEBHOOK_URL"] in result.output and app.config["TWILIO_API_URL"] in result.output
    assert result.output.count("/button PAYLOAD") == 2  # the header, and /help


def test_flask_chat_is_a_command_of_the_flask_cli(app):
    # bin/chat runs `flask --app wsgi chat`: the `flask` command finds it through pyproject's
    # "flask.commands" entry point, not on app.cli, so the servers never import it.
    from flask.cli import FlaskGroup

    result = app.test_cli_runner().invoke(FlaskGroup(), ["chat", "--help"])
    assert result.exit_code == 0, result.output
    assert "--as" in result.output and "--name" in result.output


def test_messages_that_arrive_while_you_type_are_shown_without_pressing_enter(app, twilio):
    # A notification from the backend answers nothing you typed: the watcher shows it anyway.
    client = build_client(ACCOUNT_SID, AUTH_TOKEN, twilio.url, 5)
    to = "whatsapp:+15551230606"
    chat = ChatSession(phone="+15551230606", profile_name="Ada", webhook_url="http://127.0.0.1:9/twilio/webhook",
                       auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, bot_number=SENDER, client=client)
    output: list[str] = []
    redraws: list[int] = []

    def read_line(prompt: str) -> str:
        if redraws:  # second call: the watcher has shown the message and redrawn the prompt
            return "/quit"
        client.messages.create(to=to, from_=SENDER, body="Your order has shipped")
        deadline = time.monotonic() + 10
        while not redraws and time.monotonic() < deadline:  # the user is still "typing"
            time.sleep(0.05)
        return ""

    run_repl(chat, read_line=read_line, write=output.append, poll_interval=0.05, watch_interval=0.1,
             redraw=lambda: redraws.append(len(output)))
    assert redraws, "the watcher never showed the notification"
    shown = output[:redraws[0]]
    assert "bot: Your order has shipped 🕓" in shown
    assert output.count("bot: Your order has shipped 🕓") == 1  # shown once, not again by the main loop


def test_without_the_watcher_messages_wait_for_the_next_line(twilio):
    client = build_client(ACCOUNT_SID, AUTH_TOKEN, twilio.url, 5)
    to = "whatsapp:+15551230707"
    chat = ChatSession(phone="+15551230707", profile_name=None, webhook_url="http://127.0.0.1:9/twilio/webhook",
                       auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, bot_number=SENDER, client=client)
    output: list[str] = []
    calls: list[list[str]] = []

    def read_line(prompt: str) -> str:
        calls.append(list(output))
        if len(calls) == 1:
            client.messages.create(to=to, from_=SENDER, body="hello")
            time.sleep(0.5)
            return ""
        return "/quit"

    run_repl(chat, read_line=read_line, write=output.append, watch_interval=None)
    assert calls[1] == ["bot: hello 🕓"]  # shown when the (empty) line came in, by the main loop
