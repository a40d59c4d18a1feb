"""Phone numbers never reach a log in full: `+15551234567` is written `+1555•••4567`.

A number in a log line says who wrote to the bot; operators need to tell contacts apart, not to
read their numbers. The mask covers every way a route accepts a number (`bot.phone`): `+`, `%2B`
or `00` first, then digits with spaces (`%20`, `+` in a query), dashes, dots, slashes, brackets
or percent-encoded characters between them, `whatsapp:` in front. `MaskPhoneNumbers` rewrites a
record's message, its traceback and its stack; it sits on our handler (`bot._configure_logging`),
on huey's consumer handlers (`bot.delivery.queue`) and on gunicorn's (`bot.gunicorn_logging`,
which also masks the access log's URL atoms). docs/ARCHITECTURE.md, invariant 8.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from urllib.parse import unquote

#: What a number's digits may be separated by: blanks, the punctuation libphonenumber skips
#: (ASCII and full-width forms), `+` (a space in a query string) and any percent-encoded byte.
_SEPARATOR = r"(?:[ \t\u00a0\u3000+\-.()/\[\]~\u2010-\u2015\u2212\u30fc\uff08\uff09\uff0d\uff0e\uff0f]|%[0-9A-Fa-f]{2})"
#: A number's start: `+`, `%2B` (or a full-width plus), or `00` that is not the middle of a word, an id, a decimal or a
#: percent escape (but may follow an encoded blank: routes strip blanks around a number).
_START = r"(?:\+|%2[Bb]|\uff0b|%[Ee][Ff]%[Bb][Cc]%8[Bb]|(?:(?<![\w.,%])|(?<=%20)|(?<=%09))00)"
#: ...then digits and separators, ending on a digit (percent-encoded or not).
_NUMBER = re.compile(rf"(?P<start>{_START})(?P<body>(?:\d|{_SEPARATOR})*(?:\d|%3\d))")
#: Fewer digits than this is not a number anyone can be reached at (E.164 numbers have 7 to 15;
#: more is masked too: a run that ran into a neighbouring figure still hides the number in it).
MIN_DIGITS = 7
MASK = "•••"


def _digits(body: str) -> str:
    """The body's digits, percent-decoded and in ASCII (full-width digits count too)."""
    return "".join(str(unicodedata.digit(char)) for char in unquote(body, errors="replace") if char.isdigit())


def _mask_match(match: re.Match[str]) -> str:
    digits = _digits(match["body"])
    if len(digits) < MIN_DIGITS:
        return match[0]
    if match["start"] == "00":
        # "00" is also how ids and figures begin: only a run that ends where a word would is a
        # number (a `+` is never part of an id, so "+1555...x12" is masked whatever follows).
        end = match.end()
        if end < len(match.string) and match.string[end].isalnum():
            return match[0]
    return f"{match['start']}{digits[:4]}{MASK}{digits[-4:]}"


def mask_phone(text: str) -> str:
    """`text` with every phone number kept to its first four and last four digits."""
    if "+" not in text and "%" not in text and "00" not in text and "\uff0b" not in text:
        return text  # most log lines: no regex at all
    return _NUMBER.sub(_mask_match, text)


class MaskPhoneNumbers(logging.Filter):
    """Masks the numbers in a record's final message (its arguments are merged in first), in its
    traceback (an exception's text can quote a request) and in its stack."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_phone(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # Formatted here, once: every handler's Formatter reuses `exc_text` when it is set.
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_phone(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_phone(record.stack_info)
        return True


def mask_handlers(*loggers: logging.Logger) -> None:
    """Put `MaskPhoneNumbers` on every handler of these loggers that does not have it yet
    (handlers someone else set up: huey's consumer, gunicorn)."""
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(existing, MaskPhoneNumbers) for existing in handler.filters):
                handler.addFilter(MaskPhoneNumbers())
