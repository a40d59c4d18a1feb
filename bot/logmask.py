"""Phone numbers never reach a log in full: `+15551234567` is written `+1555•••4567`.

A number in a log line says who wrote to the bot; operators need to tell contacts apart, not to
read their numbers. `MaskPhoneNumbers` rewrites every record our handler writes, and the web's
access log goes through `bot.gunicorn_logging` (its paths hold numbers: /contacts/<phone>).
"""
from __future__ import annotations

import logging
import re

#: An E.164 number (as Twilio writes it, also behind "whatsapp:"), or one written %2B-encoded in a URL.
_NUMBER = re.compile(r"(\+|%2[Bb])(\d{7,15})\b")


def mask_phone(text: str) -> str:
    """`text` with every E.164 number kept to its first four and last four digits."""
    return _NUMBER.sub(lambda m: f"{m.group(1)}{m.group(2)[:4]}•••{m.group(2)[-4:]}", text)


class MaskPhoneNumbers(logging.Filter):
    """Masks the numbers in a record's final message (its arguments are merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_phone(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
