"""Phone numbers: parse anything a backend or Twilio sends into E.164 with libphonenumber."""
from __future__ import annotations

import functools

import phonenumbers

WHATSAPP_PREFIX = "whatsapp:"


class InvalidNumber(ValueError):
    """The text is not a valid international phone number."""


def normalize_e164(raw: str) -> str:
    """Return `raw` (optionally `whatsapp:`-prefixed) as an E.164 number, e.g. '+15551234567'.

    Numbers must be international (leading '+' or '00'); there is no default region, because a
    backend serving several countries must never have a number silently read as local.
    """
    if not isinstance(raw, str):
        raise InvalidNumber("must be a string")
    return _normalized(raw)


@functools.lru_cache(maxsize=1024)
def _normalized(raw: str) -> str:
    # Cached: libphonenumber's parse costs about a twentieth of a webhook's CPU, and the same
    # contacts write and are written to again and again. Only answers are cached (an
    # InvalidNumber is raised anew each time); the function is pure.
    text = raw.strip()
    if text.lower().startswith(WHATSAPP_PREFIX):
        text = text[len(WHATSAPP_PREFIX):].strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    if not text.startswith("+"):
        raise InvalidNumber("must be an international number starting with '+' (E.164)")
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(str(exc).split("(", 1)[0].strip() or "not a phone number") from None
    # "Possible" (right length for a real country) rather than "valid": libphonenumber's validity
    # tables reject the fictional 555 ranges developers test with, and whether a number is really
    # on WhatsApp only Twilio can tell (it answers 21211/63003, which we record).
    if not phonenumbers.is_possible_number(parsed) or phonenumbers.region_code_for_country_code(parsed.country_code) == "ZZ":
        raise InvalidNumber("is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def normalize_whatsapp_address(raw: str) -> str:
    """Return `raw` as a Twilio WhatsApp address, e.g. 'whatsapp:+15551234567'."""
    return WHATSAPP_PREFIX + normalize_e164(raw)
