"""No full phone number in any log line, whatever form the backend wrote it in (issue 15, item 7).

Every form below is one a route accepts (checked first, with the route's own parser): the access
log written by the Procfile's real gunicorn logger class, huey's consumer log lines and our own
handler, tracebacks included, must show none of them in full.
"""
from __future__ import annotations

import datetime
import io
import logging
import re
import sys
from types import SimpleNamespace
from urllib.parse import unquote, unquote_plus

import pytest
from gunicorn.config import Config

from bot.gunicorn_logging import MaskingLogger
from bot.logmask import MaskPhoneNumbers, mask_phone
from bot.phone import normalize_e164

NUMBER = "+15559876543"
FULL_WIDTH = "".join(chr(0xFF10 + int(d)) for d in "15559876543")

#: /contacts/<phone>/handoff as a backend may write <phone> in the URL (raw, not yet decoded).
PATH_FORMS = [
    "+15559876543",
    "%2B15559876543",
    "%2b15559876543",
    "0015559876543",
    "+1%20555%20987%206543",
    "%2B1%20(555)%20987-6543",
    "%2B1%20%28555%29%20987%2D6543",
    "+1.555.987.6543",
    "+1-555-987-6543",
    "00%201%20555%20987%206543",
    "%20%200015559876543",
    "whatsapp:+15559876543",
    "whatsapp:0015559876543",
    "WhatsApp:%20%2B1%20555%20987%206543",
    "%2B%31%35%35%35%39%38%37%36%35%34%33",
    "+" + "".join(f"%{byte:02X}" for byte in FULL_WIDTH.encode()),
    "+15559876543x12",
    "+1%20555%20987%206543;ext=12",
]
#: ?contact= on GET /events (a query string: `+` is a blank there).
QUERY_FORMS = [
    "0015559876543",
    "%2B15559876543",
    "%2B1+555+987+6543",
    "00+1+555+987+6543",
    "+0015559876543",
    "whatsapp%3A%2B15559876543",
    "%2B1%20(555)%20987-6543",
]
#: A vanity spelling is accepted too (libphonenumber reads the letters as digits).
VANITY = "+1%20555%20987%20OKLE"


def test_every_form_here_is_one_the_routes_accept():
    for raw in PATH_FORMS:
        assert normalize_e164(unquote(raw)) == NUMBER, raw
    for raw in QUERY_FORMS:
        assert normalize_e164(unquote_plus(raw)) == NUMBER, raw
    assert normalize_e164(unquote(VANITY)) == "+15559876553"


def _leaks(text: str) -> bool:
    """Whether `text` shows the number's hidden middle, however it is spelled or encoded."""
    decoded = unquote_plus(unquote_plus(text))
    digits = "".join(str(int(char)) if char.isdigit() else char for char in decoded)
    squeezed = re.sub(r"[\s+\-.()/;:%\[\]~]", "", digits)
    return "59876" in squeezed or "9876" in squeezed or "OKLE" in decoded


@pytest.fixture
def access_log(tmp_path):
    """The Procfile's logger class, writing the request line, path and query to a file."""
    config = Config()
    config.set("accesslog", str(tmp_path / "access.log"))
    config.set("errorlog", str(tmp_path / "error.log"))
    config.set("access_log_format", '"%(r)s" %(U)s %(q)s')
    logger = MaskingLogger(config)
    yield logger, tmp_path
    for log in (logger.error_log, logger.access_log):
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)


def _request(logger: MaskingLogger, method: str, raw_uri: str) -> None:
    """One request as gunicorn's worker logs it: RAW_URI as sent, PATH_INFO decoded."""
    path, _, query = raw_uri.partition("?")
    environ = {"REQUEST_METHOD": method, "RAW_URI": raw_uri, "SERVER_PROTOCOL": "HTTP/1.1",
               "PATH_INFO": unquote(path, encoding="latin-1"), "QUERY_STRING": query, "REMOTE_ADDR": "127.0.0.1"}
    request = SimpleNamespace(headers=[("User-Agent", "backend")])
    response = SimpleNamespace(status="200 OK", sent=10, headers=[], status_code=200)
    logger.access(response, request, environ, datetime.timedelta(milliseconds=3))


def test_the_access_log_shows_no_number_in_any_accepted_form(access_log):
    logger, directory = access_log
    uris = ([("POST", f"/contacts/{form}/handoff") for form in PATH_FORMS + [VANITY]]
            + [("GET", f"/events?contact={form}&limit=5") for form in QUERY_FORMS]
            + [("PUT", f"/contacts/{PATH_FORMS[4]}/consent"), ("GET", f"/contacts/{PATH_FORMS[3]}")])
    for method, uri in uris:
        _request(logger, method, uri)
    lines = (directory / "access.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(uris)
    for (method, uri), line in zip(uris, lines):
        assert not _leaks(line), f"{uri} was logged as {line}"
        assert "•••" in line and "5543" not in line, line  # masked, still telling contacts apart
        assert "6543" in line or "6553" in line, line
    # The rest of the line is left alone.
    assert lines[0].startswith('"POST /contacts/') and lines[0].endswith('/handoff HTTP/1.1" /contacts/+1555•••6543/handoff ')


def test_gunicorns_error_log_masks_the_traceback_too(access_log):
    logger, directory = access_log
    try:
        raise ValueError(f"cannot handle /contacts/{PATH_FORMS[4]}/handoff for 00 1 555 987 6543")
    except ValueError:
        logger.exception("Error handling request /contacts/0015559876543/handoff")
    text = (directory / "error.log").read_text(encoding="utf-8")
    assert "Traceback" in text and "ValueError" in text
    assert not _leaks(text), text


@pytest.fixture
def huey_logger():
    """The 'huey' logger as `huey_consumer` leaves it (its handler, added after the app loads)."""
    from huey.consumer_options import ConsumerConfig

    logger = logging.getLogger("huey")
    before = list(logger.handlers), logger.level
    ConsumerConfig(workers=1, worker_type="thread").setup_logger(logger)
    [handler] = [h for h in logger.handlers if h not in before[0]]
    stream = io.StringIO()
    handler.setStream(stream)
    yield handler, stream
    logger.removeHandler(handler)
    logger.setLevel(before[1])


def test_huey_consumer_lines_and_tracebacks_are_masked(app, huey_logger):
    from bot.delivery.queue import huey

    handler, stream = huey_logger
    # What consumer_main does next: create the consumer (which puts the mask on its handlers).
    huey.create_consumer(workers=1, worker_type="thread")
    consumer_log = logging.getLogger("huey.consumer.Worker-1")
    for form in PATH_FORMS[:12]:
        consumer_log.warning("task for %s", unquote(form))
    try:
        raise RuntimeError(f"Twilio refused whatsapp:{unquote(PATH_FORMS[4])}")
    except RuntimeError:
        consumer_log.exception("Unhandled exception in task abc")
    text = stream.getvalue()
    assert text.count("task for") == 12 and "Traceback" in text and "RuntimeError: Twilio refused" in text
    assert not _leaks(text), text


def test_our_own_handler_masks_tracebacks(app):
    [handler] = [h for h in logging.getLogger("bot").handlers if getattr(h, "_bot_handler", False)]
    try:
        raise KeyError(f"no contact 00 1 (555) 987-6543 / {NUMBER}")
    except KeyError:
        record = logging.getLogger("bot.test").makeRecord(
            "bot.test", logging.ERROR, __file__, 1, "flow failed for %s", (NUMBER,), exc_info=sys.exc_info())
    assert handler.filter(record)
    text = handler.format(record)
    assert "Traceback" in text and "KeyError" in text and "+1555•••6543" in text
    assert not _leaks(text), text


def test_log_text_keeps_ids_figures_and_times():
    for text in ("message 0123456789abcdef took 12 ms", "id 0012345678abcdef9",
                 "[2026-12-05 10:00:00,123] took 0.0012345678 s", "3 of 5 (+12)", "limit=100&after=0042"):
        assert mask_phone(text) == text
    assert MaskPhoneNumbers().filter(logging.makeLogRecord({"msg": "x"}))
