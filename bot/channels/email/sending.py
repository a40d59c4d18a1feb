"""One email send: SendGrid's answer → Accepted, Failed or Unknown (bot.channels.outcomes).

SendGrid has no numeric error codes, so `Failed.code` is the HTTP status: a backend sees 400
(invalid), 401 (bad key or no credits), 403 (unverified sender), 429 (too fast)... The
classification follows what SendGrid answers (docs/ARCHITECTURE.md, "Email channel (pieces)",
SendGrid facts):

- 202 Accepted, empty body, `X-Message-Id` (per request, sometimes missing) → Accepted.
  Any other 2xx (sandbox mode answers 200 and produces no events) is taken as accepted too.
- 400 / 413 / other 4xx: the mail itself is wrong → Failed, not retried, with SendGrid's message.
- 403: "The from address does not match a verified Sender Identity" or a key without Mail Send:
  an operator must act, the message as it is cannot go → Failed, not retried.
- 401: a bad key AND "Maximum credits exceeded" (SendGrid's quota answer is a 401, not a 429):
  the account is at fault, not the message → Failed(retry, hold): retried slowly, never dropped,
  and it leaves once the key or the credits are fixed.
- 429 and 5xx → Failed(retry), except 502 and 504 → Unknown (see AMBIGUOUS_HTTP_STATUSES).
- No answer: a refused connection or a connect timeout (urllib raises URLError while writing the
  request) never reached SendGrid → Failed(retry). A read timeout or a connection dropped after
  the request was written → Unknown: "may have been accepted", never resent blind (invariant 2).
  SendGrid offers no lookup by our id, so what the sender does with an Unknown is its policy.
"""
from __future__ import annotations

import http.client
import json
import logging
import urllib.error
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bot.channels.outcomes import Accepted, Failed, Outcome, Unknown
from bot.vocabulary import MessageStatus

if TYPE_CHECKING:
    from sendgrid import SendGridAPIClient

log = logging.getLogger(__name__)

#: Answers that say nothing of whether SendGrid took the mail: they come from a proxy or load
#: balancer in front of the API, which lost SendGrid's answer (502) or stopped waiting for it
#: while SendGrid may still have been working (504). The same rule as Twilio's (sender.py).
#: 500 and 503 come from SendGrid's own service saying it failed or is not taking requests:
#: SendGrid documents them as "retry", so they are Failed(retry), accepting a rare duplicate.
AMBIGUOUS_HTTP_STATUSES = frozenset({502, 504})
#: The account, not the message: hold and retry slowly (bad key, or "Maximum credits exceeded").
HOLD_HTTP_STATUSES = frozenset({401})
#: The longest provider text kept (it lands in a message row and an event).
MAX_TEXT = 500


def send(client: "SendGridAPIClient", mail: dict[str, Any], started: datetime) -> Outcome:
    """POST `mail` (bot.channels.email.mail.build_mail) to /v3/mail/send and classify the answer.

    `client` comes from bot.channels.email.client.build_client (it carries the timeout).
    `started`: when this attempt began (an Unknown's `since`). Never raises for an HTTP or
    network failure; a bug (a TypeError building the request) still raises.
    """
    from python_http_client.exceptions import HTTPError

    try:
        response = client.send(mail)
    except HTTPError as exc:
        return classify_error(exc.status_code, exc.body, started)
    except urllib.error.URLError as exc:
        # urllib wraps in URLError only the errors of connecting and writing the request
        # (AbstractHTTPHandler.do_open): a refused connection, a connect timeout, a name that
        # does not resolve. SendGrid never had the whole request.
        reason = getattr(exc, "reason", exc)
        return Failed(None, f"{type(reason).__name__} connecting to SendGrid", retry=True)
    except (OSError, http.client.HTTPException) as exc:
        # Raised by getresponse() or reading the answer: the request was written, the answer
        # never came (TimeoutError), or the connection dropped (RemoteDisconnected,
        # ConnectionResetError, IncompleteRead). SendGrid may have taken the mail.
        return Unknown(f"{type(exc).__name__} talking to SendGrid", started)
    except ValueError as exc:
        # urllib refuses SENDGRID_API_URL itself ("unknown url type"): configuration, not the
        # message, so hold it until an operator fixes the URL.
        return Failed(None, f"unusable SENDGRID_API_URL ({exc})"[:MAX_TEXT], retry=True, hold=True)
    status = int(response.status_code)
    if 200 <= status < 300:
        provider_id = (response.headers.get("X-Message-Id") or "").strip()
        return Accepted(provider_id, MessageStatus.ACCEPTED.value)
    # urllib raises for anything else (python_http_client turns it into HTTPError); a 1xx or 3xx
    # reaching here would be a proxy's doing: say so rather than guess.
    return Unknown(f"HTTP {status} from SendGrid", started, status)


def classify_error(status: int, body: bytes | str | None, started: datetime) -> Outcome:
    """Failed or Unknown for SendGrid's error answer `status` with `body` (its JSON errors)."""
    text = error_text(body) or f"HTTP {status} from SendGrid"
    if status in AMBIGUOUS_HTTP_STATUSES:
        return Unknown(f"HTTP {status} from SendGrid: {text}", started, status)
    if status in HOLD_HTTP_STATUSES:
        return Failed(status, text, retry=True, http_status=status, hold=True)
    retry = status == 429 or status >= 500
    return Failed(status, text, retry=retry, http_status=status)


def error_text(body: bytes | str | None) -> str | None:
    """SendGrid's first error message (`{"errors": [{"message", "field", "help"}]}`), with its
    field when it names one; None when the body is not SendGrid's JSON (a proxy's page)."""
    if not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    message = errors[0].get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    field = errors[0].get("field")
    text = f"{message.strip()} ({field})" if isinstance(field, str) and field else message.strip()
    return text[:MAX_TEXT]
