"""gunicorn's logs without full phone numbers (the Procfile's `--logger-class`).

The request line and URL atoms hold paths such as /contacts/+15551234567/consent, written however
the backend wrote the number (`00`, spaces, `%20`, dashes...): the value of a route's phone
argument is masked whatever its form, and every line gunicorn writes (access and error log, with
tracebacks) goes through `MaskPhoneNumbers` too. Everything else of gunicorn's logger is kept.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, unquote_plus

from gunicorn.glogging import Logger

from bot.logmask import MASK, mask_handlers, mask_phone
from bot.phone import InvalidNumber, normalize_e164

#: Where a URL carries a number as a route's argument: /contacts/<phone>[/...] and ?contact=.
#: In the request line and the query string the value is still percent-encoded (it ends at a
#: blank); in PATH_INFO it is decoded and runs to the next slash, blanks included.
_PHONE_IN_RAW_URL = re.compile(r"(?P<before>/contacts/|[?&]contact=)(?P<value>[^/?&#\s\"]*)")
_PHONE_IN_PATH = re.compile(r"(?P<before>/contacts/)(?P<value>[^/]*)")


def _route_value(match: re.Match[str], *, decoded: bool) -> str:
    """What the route reads from the matched value."""
    raw = match["value"]
    if decoded:
        # PATH_INFO is WSGI's latin-1 view of the URL's UTF-8 bytes (PEP 3333).
        return raw.encode("latin-1", errors="replace").decode("utf-8", errors="replace")
    decode = unquote_plus if match["before"].endswith("=") else unquote
    return decode(raw, errors="replace")


def _masked_value(match: re.Match[str], *, decoded: bool) -> str:
    value = _route_value(match, decoded=decoded)
    try:
        # What the route reads (bot.phone accepts letters, brackets, full-width digits...),
        # masked in one canonical form.
        masked = mask_phone(normalize_e164(value))
    except InvalidNumber:
        masked = mask_phone(match["value"])
        if masked == match["value"] and any(char.isdigit() for char in value):
            masked = MASK  # refused by the route, but digits all the same: none of them is logged
    return match["before"] + masked


def mask_url(text: str, *, decoded: bool = False) -> str:
    """A request line, query string or (`decoded`) PATH_INFO with every number masked, a route's
    phone argument whatever its form."""
    pattern = _PHONE_IN_PATH if decoded else _PHONE_IN_RAW_URL
    return mask_phone(pattern.sub(lambda match: _masked_value(match, decoded=decoded), text))


class MaskingLogger(Logger):
    """gunicorn's Logger, with phone numbers masked in the request line, path and query, and in
    every record its handlers write."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # Handlers are (re)made here, on start and on reopen: mask whatever they write.
        mask_handlers(self.error_log, self.access_log)

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "q"):
            if isinstance(atoms.get(key), str):
                atoms[key] = mask_url(atoms[key], decoded=key == "U")
        return atoms
