"""Consent: the global keywords, state changes, and the append-only ledger behind them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from flask import current_app

from bot.extensions import db
from bot.delivery import events
from bot.models import ConsentEvent, Contact
from bot.channels.whatsapp.whatsapp import SANDBOX_JOIN, SANDBOX_NUMBER
from bot.vocabulary import Channel, Consent, ConsentAction
from flows.toolkit import normalize

#: Opt-in words that mean nothing else. "YES" also answers questions ("Reply YES to confirm").
UNAMBIGUOUS_OPT_IN = frozenset({"start", "unstop", "subscribe"})


#: The settings the keywords come from.
KEYWORD_SETTINGS = ("OPT_OUT_KEYWORDS", "OPT_IN_KEYWORDS", "HELP_KEYWORDS", "OPT_OUT_BUTTON_PAYLOADS",
                    "HANDOFF_KEYWORDS")


@dataclass(frozen=True)
class Keywords:
    """The configured keyword lists, normalised like incoming text."""

    opt_out: frozenset[str]
    opt_in: frozenset[str]
    help: frozenset[str]
    #: Quick-reply payloads that opt out, upper-cased (payloads are ids, not words).
    opt_out_payloads: frozenset[str] = frozenset()
    #: Words that ask for a person (human handoff).
    handoff: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls) -> "Keywords":
        """The app's keywords, normalised once per app (every inbound message asks for them)
        and again only when the configuration they come from changes."""
        cfg = current_app.config
        source = tuple(tuple(cfg.get(key) or ()) for key in KEYWORD_SETTINGS)
        cached = current_app.extensions.get("keywords")
        if cached is None or cached[0] != source:
            cached = (source, cls._normalised(cfg))
            current_app.extensions["keywords"] = cached
        return cached[1]

    @classmethod
    def _normalised(cls, cfg: Mapping[str, Any]) -> "Keywords":
        opt_out, opt_in, help_ = (frozenset(normalize(w) for w in cfg[key])
                                  for key in ("OPT_OUT_KEYWORDS", "OPT_IN_KEYWORDS", "HELP_KEYWORDS"))
        payloads = frozenset(p.strip().upper() for p in cfg.get("OPT_OUT_BUTTON_PAYLOADS") or ())
        handoff = frozenset(normalize(w) for w in cfg.get("HANDOFF_KEYWORDS") or ())
        return cls(opt_out, opt_in, help_, payloads, handoff)


def typed_words(payload: Mapping[str, Any]) -> str:
    """The message's text as keywords are compared; empty for a button press.

    A quick-reply press carries its label as the text: a button labelled "Cancel" answers the
    question on screen and must not unsubscribe anyone, so keywords apply to typed text only.
    """
    if payload.get("ButtonPayload"):
        return ""
    return normalize(str(payload.get("Body") or ""))


def opt_out_source(payload: Mapping[str, Any], keywords: Keywords) -> str | None:
    """How this inbound message asks to opt out ("keyword", "button", "twilio_opt_out"), or None."""
    if str(payload.get("OptOutType") or "").upper() == "STOP":  # Twilio's Advanced Opt-Out
        return "twilio_opt_out"
    if typed_words(payload) in keywords.opt_out:
        return "keyword"
    button = str(payload.get("ButtonPayload") or "").strip().upper()
    if button and button in keywords.opt_out_payloads:
        return "button"
    return None


def is_sandbox_join(payload: Mapping[str, Any]) -> bool:
    """A "join <code>" sent to the Twilio sandbox's number (elsewhere it is just text)."""
    return payload.get("To") == SANDBOX_NUMBER and bool(SANDBOX_JOIN.match(typed_words(payload)))


def change_consent(contact: Contact, new_state: str, *, source: str, words: str | None = None,
                   message_sid: str | None = None) -> bool:
    """Set the contact's consent and record it in the ledger; False when nothing changed.

    Does not commit: the caller commits the change before sending any confirmation (invariant 4).
    """
    if contact.consent == new_state:
        return False
    action = ConsentAction.OPT_OUT if new_state == Consent.OPTED_OUT else ConsentAction.OPT_IN
    db.session.add(ConsentEvent(contact_id=contact.id, action=action, previous=contact.consent,
                                source=source, words=words, message_sid=message_sid))
    # The backend hears of it in the same transaction (invariant 12).
    events.consent_changed(contact, action == ConsentAction.OPT_IN, previous=contact.consent, source=source,
                           words=words, message_sid=message_sid)
    contact.consent = new_state
    return True


def record_decline(contact: Contact, *, words: str | None = None, message_sid: str | None = None) -> None:
    """Record that the contact said no to a flow's opt-in question.

    Consent stays unknown (nothing to send them beyond replies), but the answer is on record.
    """
    db.session.add(ConsentEvent(contact_id=contact.id, action=ConsentAction.DECLINED, previous=contact.consent,
                                source="flow", words=words, message_sid=message_sid))


def change_email_consent(contact: Contact, new_state: str, *, source: str, words: str | None = None) -> bool:
    """Set the contact's email consent and record it in the ledger; False when nothing changed.

    Email consent is the contact's own, apart from WhatsApp's (invariant 14): an unsubscribe or
    a spam report never touches `consent`, and STOP never touches `email_consent`. Does not commit.
    """
    if contact.email_consent == new_state:
        return False
    action = ConsentAction.OPT_OUT if new_state == Consent.OPTED_OUT else ConsentAction.OPT_IN
    db.session.add(ConsentEvent(contact_id=contact.id, channel=Channel.EMAIL, action=action,
                                previous=contact.email_consent, source=source, words=words))
    events.consent_changed(contact, action == ConsentAction.OPT_IN, previous=contact.email_consent, source=source,
                           words=words, message_sid=None, channel=Channel.EMAIL)
    contact.email_consent = new_state
    return True
