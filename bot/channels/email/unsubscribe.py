"""Signed one-click unsubscribe tokens: the `/unsubscribe/<token>` link of every email.

RFC 8058 one-click: the mailbox provider POSTs `List-Unsubscribe=One-Click` to the link with no
cookie and no confirmation page, so the link alone must name the recipient, unforgeably, and keep
working (no expiry: an old email's link still unsubscribes; using it twice is harmless).

The token is itsdangerous' URLSafeSerializer (Flask's own dependency: HMAC-SHA1 over a key
derived from the secret and a salt of our own) over `[contact_id, digest]`. The digest is a keyed
hash of the address, not the address: a token is readable base64, and it lands in URLs and
access logs, which must never carry an email address. It binds the link to the address it was
sent to, so a link of a user's old address does not unsubscribe the new one.

The secret is passed in (the app's SECRET_KEY): this package imports no Flask.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import NamedTuple

from itsdangerous import BadSignature, URLSafeSerializer

#: A namespace of our own: a token signed for anything else with the same secret never passes.
SALT = "bot.channels.email.unsubscribe"
_DIGEST_HEX = 20  # 80 bits: the token's HMAC is what makes it unforgeable; this only binds it


class UnsubscribeToken(NamedTuple):
    """What a valid token says: the contact, and (as a digest) the address it was sent to."""

    contact_id: int | str
    email_digest: str

    def matches(self, email: str | None, secret_key: str | bytes) -> bool:
        """Whether the token was made for `email` (case-insensitive; the contact's current one)."""
        return bool(email) and hmac.compare_digest(self.email_digest, email_digest(email, secret_key))


def _serializer(secret_key: str | bytes) -> URLSafeSerializer:
    if not secret_key:
        raise ValueError("an unsubscribe token needs a non-empty secret key")
    return URLSafeSerializer(secret_key, salt=SALT)


def email_digest(email: str, secret_key: str | bytes) -> str:
    """A keyed digest of the address (lower-cased, trimmed): equal for the same address and
    key, meaningless without the key (a plain hash of an address is reversed by a list)."""
    key = secret_key.encode() if isinstance(secret_key, str) else secret_key
    mac = hmac.new(key, b"email-digest\x00" + email.strip().lower().encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()[:_DIGEST_HEX]


def make_token(contact_id: int | str, email: str, *, secret_key: str | bytes) -> str:
    """The URL-safe token for the unsubscribe link of an email to `email` (contact `contact_id`)."""
    return _serializer(secret_key).dumps([contact_id, email_digest(email, secret_key)])


def read_token(token: str, *, secret_key: str | bytes) -> UnsubscribeToken | None:
    """The token's contact and address digest, or None for a forged, altered or malformed one.

    The caller still checks `matches(contact.email, secret_key)` before opting anyone out."""
    if not isinstance(token, str) or not token or len(token) > 512:
        return None
    try:
        payload = _serializer(secret_key).loads(token)
    except (BadSignature, ValueError, UnicodeError):
        return None
    if (not isinstance(payload, list) or len(payload) != 2 or isinstance(payload[0], bool)
            or not isinstance(payload[0], (int, str)) or not isinstance(payload[1], str)):
        return None
    return UnsubscribeToken(payload[0], payload[1])
