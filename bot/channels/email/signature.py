"""SendGrid's Event Webhook signature: ECDSA P-256 / SHA-256 over the timestamp and the raw body.

SendGrid signs each POST of an event batch (docs/ARCHITECTURE.md, "Email channel (pieces)"):
`X-Twilio-Email-Event-Webhook-Signature` is base64 of an ASN.1 DER ECDSA signature and
`X-Twilio-Email-Event-Webhook-Timestamp` is unix seconds; the signed bytes are the timestamp
string followed by the request body **exactly as received** (a body re-serialized from its
parsed JSON fails, by design). The public key is SENDGRID_WEBHOOK_PUBLIC_KEY, the base64 DER
SubjectPublicKeyInfo SendGrid's settings page shows (PEM armour is accepted too).

SendGrid documents no replay window; we refuse a timestamp more than 5 minutes old (or ahead),
so a captured batch cannot be replayed later. Verified with `cryptography` directly (what the
SDK's `sendgrid.helpers.eventwebhook.EventWebhook` does, minus its str-only payload and its
exceptions on malformed headers).
"""
from __future__ import annotations

import base64
import binascii
import time
from enum import StrEnum
from typing import Mapping, NamedTuple

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
#: How old (or how far ahead, for clock skew) a signed timestamp may be.
MAX_AGE_SECONDS = 5 * 60


class Refusal(StrEnum):
    """Why a signed request was refused (for the log and the 4xx's `error`; never the key)."""

    MISSING = "missing signature or timestamp header"
    MALFORMED = "malformed signature or timestamp header"
    STALE = "timestamp outside the allowed window"
    FORGED = "signature does not match"


class InvalidPublicKey(ValueError):
    """SENDGRID_WEBHOOK_PUBLIC_KEY is not a P-256 public key (a configuration error)."""


class Verdict(NamedTuple):
    """The outcome of a check: `ok`, else `refusal` says why (a tuple: `ok, why = verify(...)`)."""

    ok: bool
    refusal: Refusal | None = None


def load_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """The P-256 key from SENDGRID_WEBHOOK_PUBLIC_KEY: base64 DER SubjectPublicKeyInfo (as
    SendGrid shows it, starting `MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE`), with or without PEM
    armour and line breaks. InvalidPublicKey for anything else."""
    text = "".join(line for line in (value or "").strip().splitlines() if not line.startswith("-----"))
    try:
        key = load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise InvalidPublicKey("SENDGRID_WEBHOOK_PUBLIC_KEY is not a base64 DER public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidPublicKey("SENDGRID_WEBHOOK_PUBLIC_KEY is not an ECDSA P-256 key")
    return key


def verify(public_key: ec.EllipticCurvePublicKey, headers: Mapping[str, str], body: bytes,
           *, now: float | None = None, max_age: float = MAX_AGE_SECONDS) -> Verdict:
    """Check a POST from SendGrid's Event Webhook: its signature over the timestamp header plus
    the RAW `body` bytes, and that the timestamp is within `max_age` seconds of `now` (default:
    the clock). `headers` is any mapping with the request's headers (a werkzeug Headers object is
    case-insensitive; a plain dict must use SendGrid's spelling). Never raises on bad input."""
    signature = headers.get(SIGNATURE_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    if not signature or not timestamp:
        return Verdict(False, Refusal.MISSING)
    timestamp = timestamp.strip()
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return Verdict(False, Refusal.MALFORMED)
    try:
        der = base64.b64decode(signature.strip(), validate=True)
    except (ValueError, binascii.Error):
        return Verdict(False, Refusal.MALFORMED)
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > max_age:
        return Verdict(False, Refusal.STALE)
    try:
        public_key.verify(der, timestamp.encode("ascii") + bytes(body), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):  # ValueError: not a DER signature at all
        return Verdict(False, Refusal.FORGED)
    return Verdict(True)
