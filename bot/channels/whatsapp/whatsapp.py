"""What WhatsApp (through Twilio) imposes: the 24-hour window, the sandbox, message sizes."""
from __future__ import annotations

import re
from datetime import datetime, timedelta

from bot.clock import utcnow

#: WhatsApp's customer-service window: free-form text only this long after the user last wrote.
SESSION_WINDOW = timedelta(hours=24)
#: Twilio refuses longer bodies with 21617.
MAX_BODY_CHARS = 1600
#: WhatsApp's limit for a template's text with its variables (63021).
MAX_TEMPLATE_VARIABLES_CHARS = 1024
#: The Twilio sandbox's shared WhatsApp number: only there does "join <code>" mean joining.
SANDBOX_NUMBER = "whatsapp:+14155238886"
#: The sandbox's join message, "join <code>" (codes are two words, "bright-sun"), normalised.
SANDBOX_JOIN = re.compile(r"^join [a-z0-9]+(?: [a-z0-9]+)*$")


def within_window(last_inbound_at: datetime | None, now: datetime | None = None) -> bool:
    """Whether free-form text may go to a contact who last wrote at `last_inbound_at`."""
    now = now or utcnow()
    return last_inbound_at is not None and now - last_inbound_at < SESSION_WINDOW
