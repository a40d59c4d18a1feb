"""Turning a flow's replies into outbound message rows: render the copy, respect the window.

Copy lives in templates/ as Jinja2 plain text. User text only ever arrives as a variable, and
undefined variables are errors, so a typo in a template fails a test instead of a user. The
contact's `locale` chooses the copy (bot/locales.py: templates/<flow>/<locale>/<name>.txt, else its
language's, else the default copy) and the approved template sent outside the window.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Iterable

from flask import current_app
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from bot import locales
from bot.clock import utcnow
from bot.models import Contact, Message
from bot.templates_dir import TEMPLATES_DIR
from bot.channels.whatsapp.errors import OUTSIDE_WINDOW_CODE, TOO_LONG_CODE
from bot.channels.whatsapp.whatsapp import MAX_BODY_CHARS, within_window
from bot.vocabulary import Direction, Kind, MessageStatus
from flows.toolkit import Reply

log = logging.getLogger(__name__)



@lru_cache(maxsize=1)
def environment() -> Environment:
    """The Jinja2 environment for message copy (plain text: no HTML escaping).

    No auto-reload: the copy ships with the code and its index is read once per process
    (locales.copy_index), so a template is compiled once and never checked on disk again (a
    stat per reply, in the turn's CPU; bench/THROUGHPUT.md, "The turn in one statement")."""
    return Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), undefined=StrictUndefined, auto_reload=False,
                       autoescape=False, keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True)


def render(template: str, variables: dict[str, Any], locale: str | None = None) -> str:
    """Render templates/<template>.txt in `locale` (resolved: exact, its language, the default
    copy); the bot's name is always available as `business`."""
    config = current_app.config
    context = {"business": config.get("BOT_NAME", "us"), **variables}
    path = _copy_path(template, locale, locales.default_locale(config))
    return environment().get_template(path).render(context).strip()


@lru_cache(maxsize=1024)
def _copy_path(template: str, locale: str | None, default_locale: str) -> str:
    """`locales.flow_copy_path`, resolved once per template, locale and DEFAULT_LOCALE (all it
    depends on for flow copy: the index of templates/ is read once per process anyway)."""
    return locales.flow_copy_path(template, locale, config={"DEFAULT_LOCALE": default_locale}, root=TEMPLATES_DIR)


def build_messages(replies: Iterable[Reply], contact: Contact, *, conversation_id: str | None = None,
                   kind: str = Kind.REPLY) -> list[Message]:
    """Message rows (pending) for `replies`, in the contact's locale; outside the 24-hour window,
    an approved template in that locale (or its language, or the default's) replaces the text,
    or the reply is recorded as skipped (failed, 63016) and never sent."""
    in_window = within_window(contact.last_inbound_at)
    replies = list(replies)
    created = _creation_times(len(replies))
    rows = []
    for position, reply in enumerate(replies):
        body = render(reply.template, dict(reply.variables), contact.locale)
        row = Message(direction=Direction.OUTBOUND, kind=kind, contact_id=contact.id,
                      conversation_id=conversation_id, body=body, status=MessageStatus.PENDING, status_rank=MessageStatus.PENDING.rank,
                      template=reply.template, locale=_copy_locale(reply.template, contact.locale),
                      created_at=created + timedelta(microseconds=position))
        if len(body) > MAX_BODY_CHARS and in_window:
            # Long user-supplied variables can do this; Twilio would refuse it with the same code.
            _skip(row, TOO_LONG_CODE, f"the rendered text is {len(body)} characters (at most {MAX_BODY_CHARS})")
            log.warning("reply %s to %s skipped: %d characters", reply.template, contact.phone, len(body))
        elif not in_window:
            sid = locales.content_sid(reply.content_template, contact.locale) if reply.content_template else None
            if sid:
                row.content_sid = sid
                row.template = reply.content_template
                row.variables = {str(k): str(v) for k, v in (reply.content_variables or {}).items()}
                row.locale = locales.template_locale(locales.Copy.WHATSAPP, reply.content_template, contact.locale)
            else:
                _skip(row, OUTSIDE_WINDOW_CODE, f"outside the 24-hour window and no approved template "
                                                f"({reply.content_template or 'none declared'}) in TWILIO_CONTENT_SIDS"
                                                + (f" for locale {contact.locale}" if contact.locale else ""))
                log.info("reply %s to %s skipped: outside the window, no template", reply.template, contact.phone)
        rows.append(row)
    return rows


def _copy_locale(template: str, locale: str | None) -> str | None:
    """The locale `render` chose for a reply's copy (stored on its row: docs/ARCHITECTURE.md,
    "Languages"); None for a template the index does not know (render failed on it already)."""
    return locales.template_locale(locales.Copy.FLOW, template, locale, root=TEMPLATES_DIR)


_clock_lock = threading.Lock()
_last_created = datetime.min


def _creation_times(count: int) -> datetime:
    """The first of `count` creation times, each a microsecond after the one before and after any
    this process handed out: replies leave in creation order (the sender sends a contact's
    messages one at a time by creation time), so no two of a turn may share a timestamp."""
    global _last_created
    with _clock_lock:
        start = max(utcnow(), _last_created + timedelta(microseconds=1))
        _last_created = start + timedelta(microseconds=max(count - 1, 0))
    return start


def _skip(row: Message, code: int, reason: str) -> None:
    """Record a reply as never sent (failed, with Twilio's code for the same refusal)."""
    row.status, row.status_rank = MessageStatus.FAILED, MessageStatus.FAILED.rank
    row.error_code = code
    row.error_message = f"skipped: {reason}"
