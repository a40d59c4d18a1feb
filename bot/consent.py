"""Consent: the global keywords, state changes, and the append-only ledger behind them."""
from __future__ import annotations

import re
from dataclasses import dataclass

from flask import current_app

from bot.extensions import db
from bot.models import Consent, ConsentEvent, Contact
from flows.toolkit import normalize

#: The Twilio sandbox's join message: "join <two-word-code>".
SANDBOX_JOIN = re.compile(r"^join [a-z0-9]+(?:[ -][a-z0-9]+)*$")


@dataclass(frozen=True)
class Keywords:
    """The configured keyword lists, normalised like incoming text."""

    opt_out: frozenset[str]
    opt_in: frozenset[str]
    help: frozenset[str]

    @classmethod
    def from_config(cls) -> "Keywords":
        cfg = current_app.config
        return cls(*(frozenset(normalize(w) for w in cfg[key])
                     for key in ("OPT_OUT_KEYWORDS", "OPT_IN_KEYWORDS", "HELP_KEYWORDS")))


def change_consent(contact: Contact, new_state: str, *, source: str, words: str | None = None,
                   message_sid: str | None = None) -> bool:
    """Set the contact's consent and record it in the ledger; False when nothing changed.

    Does not commit: the caller commits the change before sending any confirmation (invariant 4).
    """
    if contact.consent == new_state:
        return False
    action = {Consent.OPTED_OUT: "opt_out", Consent.OPTED_IN: "opt_in"}.get(new_state, new_state)
    db.session.add(ConsentEvent(contact_id=contact.id, action=action, previous=contact.consent,
                                source=source, words=words, message_sid=message_sid))
    contact.consent = new_state
    return True
