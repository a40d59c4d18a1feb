"""The body of one `POST /v3/mail/send`: one recipient, our message id, one-click unsubscribe.

Built as the v3 JSON itself (a dict the SDK serializes), not with the SDK's `Mail` helper: the
shape is SendGrid's documented one and every field is visible here. What it must carry
(docs/ARCHITECTURE.md, "Email channel (pieces)"):

- `custom_args: {"message_id": <our id>}`: SendGrid copies custom args, top-level, into every
  event of that email; it is how an event finds its message, since `X-Message-Id` is per request
  and sometimes missing. Values must be strings (SendGrid refuses others).
- `List-Unsubscribe: <https://…/unsubscribe/<token>>` (RFC 2369) and
  `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058): the mailbox provider POSTs to
  the link itself; Gmail and Yahoo require it of bulk senders since February 2024.
- `content`: text/plain before text/html (SendGrid refuses the other order).
"""
from __future__ import annotations

from email.utils import parseaddr
from typing import Any

#: The custom arg that carries our message id into every event (bot.channels.email.webhook_events).
MESSAGE_ID_ARG = "message_id"
ONE_CLICK = "List-Unsubscribe=One-Click"


class InvalidMail(ValueError):
    """The mail cannot be built (an address or a link is unusable); the message says which field."""


def parse_address(value: str, field: str = "from") -> tuple[str, str | None]:
    """(address, display name or None) of `value`, "Name <address>" or a bare address
    (email.utils.parseaddr); InvalidMail naming `field` when there is no usable address."""
    name, address = parseaddr(value or "")
    local, at, domain = address.rpartition("@")
    if not (at and local and "." in domain) or any(c.isspace() for c in address):
        raise InvalidMail(f"{field}: not an email address")
    return address, (name.strip() or None)


def _unsubscribe_header(url: str) -> str:
    # The header is `<URL>`: a URL that could close the angle bracket or start a new header line
    # would let one message rewrite its own headers.
    if not url.startswith(("https://", "http://")) or any(c in url for c in "<>\r\n ,"):
        raise InvalidMail("unsubscribe_url: not a usable link")
    return f"<{url}>"


def build_mail(*, message_id: str, to_email: str, to_name: str | None, from_: str, subject: str,
               text: str, html: str | None, unsubscribe_url: str) -> dict[str, Any]:
    """The v3 mail/send JSON body for one email to one recipient.

    `from_` is EMAIL_FROM ("Name <address>"). `html` may be None (a text-only email). Raises
    InvalidMail for an unusable address, link or an empty subject/text (SendGrid would answer 400).
    """
    to_address, _ = parse_address(to_email, "to")
    from_address, from_name = parse_address(from_, "from")
    if not subject or not subject.strip():
        raise InvalidMail("subject: empty")
    if not text:
        raise InvalidMail("text: empty")
    recipient: dict[str, str] = {"email": to_address}
    if to_name:
        recipient["name"] = to_name
    sender: dict[str, str] = {"email": from_address}
    if from_name:
        sender["name"] = from_name
    content = [{"type": "text/plain", "value": text}]  # text/plain first: SendGrid requires it
    if html:
        content.append({"type": "text/html", "value": html})
    return {
        "personalizations": [{"to": [recipient]}],
        "from": sender,
        # One line: the subject becomes a header; a line break in it is never what was meant.
        "subject": " ".join(subject.split()),
        "content": content,
        "custom_args": {MESSAGE_ID_ARG: str(message_id)},
        "headers": {
            "List-Unsubscribe": _unsubscribe_header(unsubscribe_url),
            "List-Unsubscribe-Post": ONE_CLICK,
        },
        # Our link is the one that records the opt-out in our ledger: SendGrid's own subscription
        # tracking would add a second link (and a footer) that only SendGrid knows about.
        "tracking_settings": {"subscription_tracking": {"enable": False}},
    }
