"""What a failure's error code means, in the provider's words, and where its page is.

The codes are Twilio's (our own refusals reuse Twilio's numbers: bot/channels/whatsapp/errors.py);
the texts follow Twilio's error dictionary, shortened, with what an operator can do about it.
"""
from __future__ import annotations

from dataclasses import dataclass

TWILIO_ERROR_PAGE = "https://www.twilio.com/docs/api/errors/{code}"


@dataclass(frozen=True)
class Explanation:
    """A code's meaning and what to do about it."""

    title: str
    advice: str


EXPLANATIONS: dict[int, Explanation] = {
    20429: Explanation("Too many requests", "Twilio's REST concurrency limit: retried with backoff, nothing to do."),
    21211: Explanation("Invalid 'To' phone number", "The number is not a valid phone number: fix it in your backend."),
    21408: Explanation("Permission to send to this region is not enabled",
                       "Enable the country in Twilio's geographic permissions."),
    21610: Explanation("Attempt to send to an unsubscribed recipient",
                       "The person opted out (STOP); nothing reaches them until they opt back in."),
    21617: Explanation("The message body exceeds 1600 characters", "Shorten the message."),
    30003: Explanation("Unreachable destination handset", "The phone is off or out of coverage; tried again once, later."),
    30004: Explanation("Message blocked", "The recipient or their carrier blocked it."),
    30005: Explanation("Unknown destination handset", "The number does not exist any more."),
    30006: Explanation("Landline or unreachable carrier", "The number cannot receive this channel."),
    30007: Explanation("Message filtered", "The carrier filtered it as spam or against its rules."),
    30008: Explanation("Unknown error", "Twilio could not tell; retried a few times."),
    63003: Explanation("Channel could not find the To address", "The number is not on WhatsApp."),
    63014: Explanation("Blocked by the user", "The person blocked this business on WhatsApp."),
    63015: Explanation("Sandbox recipient has not joined",
                       "On Twilio's sandbox the person must send 'join <code>' first (it lasts 3 days)."),
    63016: Explanation("Outside the 24-hour window",
                       "Free-form text only within 24 hours of the person's last message: send an approved "
                       "template (TWILIO_CONTENT_SIDS) or wait for them to write."),
    63018: Explanation("Rate limit exceeded", "Sent faster than the sender allows; the whole send rate slowed down."),
    63021: Explanation("Invalid content", "The template or its variables were refused: check them in Twilio's console."),
    63024: Explanation("Invalid message recipient", "The number cannot receive WhatsApp messages."),
    63032: Explanation("Marketing message withheld (experiment)",
                       "Meta withholds some marketing templates from some users; send a utility template."),
    63049: Explanation("Meta chose not to deliver this marketing message",
                       "Meta limits marketing messages per user; nothing to retry."),
}


def explain(code: int | None) -> Explanation | None:
    """The explanation of a known code, or None."""
    return EXPLANATIONS.get(code) if code is not None else None


def error_page(code: int | None) -> str | None:
    """Twilio's page about the code (every Twilio error code has one)."""
    return TWILIO_ERROR_PAGE.format(code=code) if code is not None else None
