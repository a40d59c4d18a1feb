"""The engine's stages: an ordered table, the first stage that answers a message wins.

The shape of python-telegram-bot's handler groups. Each stage is a function of one `Turn` that
returns the replies it queued (an empty list: answered with silence) or None to let the next stage
try. What is special about a flow (it runs on first contact, it asks for consent, it yields to
other flows' entry points) is declared on the flow; no stage names one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from bot.conversations.consent import (UNAMBIGUOUS_OPT_IN, Keywords, change_consent, is_sandbox_join,
                                       opt_out_source, typed_words)
from bot.conversations.handoff import HandoffBy, end_handoff, in_handoff, start_handoff
from bot.conversations.store import (answer_consent_question, answer_consent_questions, apply_step,
                                     end_conversation, end_open_conversations, has_run, new_conversation,
                                     open_conversation, send_replies, start_flow)
from bot.models import Contact, Conversation, Message
from bot.vocabulary import Consent, ConversationStatus, Kind, StartedBy
from flows import registry
from flows.toolkit import Flow, Inbound, Reply, Step, UndeclaredTarget, UnknownState

log = logging.getLogger(__name__)

#: Hellos that deserve a hello back rather than "Sorry, I didn't get that".
GREETINGS = frozenset({"hi", "hello", "hey", "hiya", "hallo", "hola", "good morning", "good afternoon",
                       "good evening", "hi there", "hello there"})


@dataclass
class Turn:
    """One inbound message being handled, with what every stage reads of it."""

    contact: Contact
    message: Message
    payload: Mapping[str, Any]
    inbound: Inbound
    #: The typed text as keywords compare it (empty for a button press).
    words: str
    keywords: Keywords
    flows: Mapping[str, Flow] = field(default_factory=dict)

    @classmethod
    def of(cls, contact: Contact, message: Message) -> "Turn":
        payload = message.payload or {"Body": message.body or ""}
        return cls(contact=contact, message=message, payload=payload, inbound=Inbound.from_twilio(payload),
                   words=typed_words(payload), keywords=Keywords.from_config(), flows=registry())

    @property
    def advanced_opt_out(self) -> str:
        """Twilio Advanced Opt-Out's verdict on this message (STOP, START, HELP) or ''."""
        return str(self.payload.get("OptOutType") or "").upper()

    def user_variables(self) -> dict[str, Any]:
        """What a flow the user starts is given: their WhatsApp profile name."""
        return {"name": self.contact.profile_name}

    def reply(self, template: str, conversation: Conversation | None = None, **variables: Any) -> list[Message]:
        return send_replies(self.contact, [Reply(template, variables)], conversation)


Stage = Callable[[Turn], "list[Message] | None"]


# --- 1. consent keywords: they pre-empt any flow -------------------------------------------------

def consent_keywords(turn: Turn) -> list[Message] | None:
    """STOP and its kin, opt-in words, the sandbox's join; silence for the opted-out; HELP."""
    source = opt_out_source(turn.payload, turn.keywords)
    if source:
        return opt_out(turn, source)
    if is_sandbox_join(turn.payload):
        return opt_in(turn, "sandbox_join")
    wants_in = turn.words in turn.keywords.opt_in or turn.advanced_opt_out == "START"
    if wants_in and turn.contact.consent != Consent.OPTED_IN and not _answers_open_flow(
            turn, strong=turn.words in UNAMBIGUOUS_OPT_IN or turn.advanced_opt_out == "START"):
        return opt_in(turn, "keyword")
    if turn.contact.consent == Consent.OPTED_OUT:
        log.info("message %s from an opted-out contact recorded, not answered", turn.message.id)
        return []
    if turn.words in turn.keywords.help or turn.advanced_opt_out == "HELP":
        return turn.reply("common/help")
    return None


def _answers_open_flow(turn: Turn, *, strong: bool) -> bool:
    """Whether an opt-in word is the answer to an open flow's question rather than an opt-in.

    A contact of unknown consent whom the backend sent an appointment reminder answers "Yes" to
    confirm it. Opted-out contacts have no open conversation, so for them YES always opts in; and
    while a flow that asks for consent is open, YES is the opt-in it asks for.
    """
    if strong or turn.contact.consent != Consent.UNKNOWN:
        return False
    conversation = open_conversation(turn.contact.id)
    flow = turn.flows.get(conversation.flow) if conversation is not None else None
    if flow is None or flow.asks_consent:
        return False
    # Only a route made for this answer counts ("yes" to "Reply YES to confirm"), not a
    # catch-all that would take any text (a comment box, a re-ask).
    return flow.expects(conversation.state, turn.inbound)


def opt_out(turn: Turn, source: str) -> list[Message]:
    """Opt out, and confirm once (a repeated STOP is already obeyed: silence)."""
    if not obey_opt_out(turn.contact, turn.message, source):
        return []
    return send_replies(turn.contact, [Reply("subscription/opted_out")], kind=Kind.OPT_OUT_CONFIRMATION)


def obey_opt_out(contact: Contact, message: Message, source: str = "keyword") -> bool:
    """Opt the contact out and cancel their conversations; False if they already were."""
    if not change_consent(contact, Consent.OPTED_OUT, source=source, words=message.body,
                          message_sid=message.twilio_sid):
        return False
    end_open_conversations(contact.id, ConversationStatus.CANCELLED, error="contact opted out")
    return True


def opt_in(turn: Turn, source: str) -> list[Message]:
    """Opt in; a flow asking for consent has its answer. A repeated YES needs no confirmation."""
    changed = change_consent(turn.contact, Consent.OPTED_IN, source=source, words=turn.message.body,
                             message_sid=turn.message.twilio_sid)
    answer_consent_questions(turn.contact.id, turn.flows)
    if not changed and source == "keyword":
        return []
    return turn.reply("subscription/opted_in", name=turn.contact.profile_name)


# --- 2. human handoff: a person answers, the bot is silent --------------------------------------

def human_handoff(turn: Turn) -> list[Message] | None:
    """During a handoff the bot answers nothing (the engine pushes the message to the backend for
    an agent); one that ran out ends here and the bot answers again. The handoff keywords start one."""
    contact = turn.contact
    if contact.handoff_until is not None:
        if in_handoff(contact):
            return []
        end_handoff(contact, by=HandoffBy.EXPIRY)
    if turn.words and turn.words in turn.keywords.handoff:
        start_handoff(contact, reason=f"the user asked for a person ({turn.words!r})", by=HandoffBy.USER)
        return turn.reply("handoff/started", name=contact.profile_name)
    return None


# --- 3. the open conversation ---------------------------------------------------------------

def the_open_conversation(turn: Turn) -> list[Message] | None:
    """The contact's open conversation takes the message (or yields it to an entry point)."""
    conversation = open_conversation(turn.contact.id)
    if conversation is None:
        return None
    flow = turn.flows.get(conversation.flow)
    if flow is not None and flow.asks_consent and turn.contact.consent == Consent.OPTED_IN:
        # Consent arrived another way (the API, a backend-opened question): the question is
        # answered, and this message is for the stages after this one.
        answer_consent_question(conversation)
        return None
    if flow is not None and flow.yields_to_entry_points and not flow.expects(conversation.state, turn.inbound):
        started = entry_points(turn)
        if started is not None:
            end_conversation(conversation, ConversationStatus.COMPLETED,
                             outcome=dict(flow.yield_outcome) if flow.yield_outcome is not None else None)
            return started
    try:
        if flow is None:
            raise UnknownState(f"flow {conversation.flow!r} no longer exists")
        step = flow.handle(conversation.state, turn.inbound, conversation.data or {})
    except UndeclaredTarget:
        raise  # a bug in the flow, not a state that vanished: the engine apologises and ends it
    except UnknownState as exc:
        return _restart(turn, conversation, flow, str(exc))
    if step is None:
        return turn.reply("common/not_understood", conversation)
    return _take_step(turn, conversation, flow, step)


def _take_step(turn: Turn, conversation: Conversation, flow: Flow, step: Step) -> list[Message]:
    """Persist a step a message caused; one that says `handoff` gives the contact to a person
    (the conversation ends, and the bot is silent until the handoff ends)."""
    replies = apply_step(turn.contact, conversation, flow, step)
    if step.handoff:
        start_handoff(turn.contact, reason=step.handoff, by=HandoffBy.FLOW)
    return replies


def _restart(turn: Turn, stale: Conversation, flow: Flow | None, reason: str) -> list[Message]:
    """A stored state the flow no longer has: restart the flow rather than crash."""
    log.warning("conversation %s restarted: %s", stale.id, reason)
    end_conversation(stale, ConversationStatus.FAILED, error=f"restarted: {reason}")
    replies = turn.reply("common/restarted")
    if flow is not None and flow.start is not None:
        # Begin again from the top, with what it was started with (a user-started flow: the
        # same variables a user-started flow is given).
        variables = stale.variables if stale.variables is not None else turn.user_variables()
        return replies + start_flow(turn.contact, flow, variables, started_by=StartedBy(stale.started_by))
    if flow is not None:
        step = flow.handle(None, turn.inbound, {})
        if step is not None:
            return replies + _take_step(turn, new_conversation(turn.contact, flow, started_by=StartedBy.USER),
                                        flow, step)
    return replies


# --- 4. entry points --------------------------------------------------------------------------

def entry_points(turn: Turn) -> list[Message] | None:
    """Start the first flow whose entry point takes this message."""
    for flow in turn.flows.values():
        step = flow.handle(None, turn.inbound, {})
        if step is not None:
            conversation = new_conversation(turn.contact, flow, started_by=StartedBy.USER)
            return _take_step(turn, conversation, flow, step)
    return None


# --- 5. first contact -------------------------------------------------------------------------

def first_contact(turn: Turn) -> list[Message] | None:
    """A flow declared `on_first_contact` runs once, on a contact's first message.

    One that asks for consent runs only while the contact's consent is unknown: an opted-in
    contact is never asked again.
    """
    for flow in turn.flows.values():
        if not flow.on_first_contact:
            continue
        if flow.asks_consent and turn.contact.consent != Consent.UNKNOWN:
            return None
        if has_run(turn.contact.id, flow):
            return None
        return start_flow(turn.contact, flow, turn.user_variables(), started_by=StartedBy.USER)
    return None


# --- 6. default replies -----------------------------------------------------------------------

def default_replies(turn: Turn) -> list[Message]:
    """Nothing else answered: 'already subscribed', a hello back, or 'didn't get that'."""
    if turn.words in turn.keywords.opt_in and turn.contact.consent == Consent.OPTED_IN:
        return turn.reply("subscription/already_subscribed", name=turn.contact.profile_name)
    if turn.words in GREETINGS:
        return turn.reply("common/greeting", name=turn.contact.profile_name)
    return turn.reply("common/not_understood")


#: The order matters: consent words pre-empt every flow; an open conversation goes before new ones.
STAGES: tuple[Stage, ...] = (consent_keywords, human_handoff, the_open_conversation, entry_points, first_contact,
                             default_replies)


def run_stages(turn: Turn, stages: tuple[Stage, ...] = STAGES) -> list[Message]:
    """Run `turn` through the stages; the first that answers (even with silence) wins."""
    for stage in stages:
        answered = stage(turn)
        if answered is not None:
            return answered
    return []
