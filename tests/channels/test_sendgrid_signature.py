"""SendGrid's Event Webhook signature (bot/channels/email/signature.py), and the event parser.

The simulator signs as SendGrid does; SendGrid's own verifier (sendgrid.helpers.eventwebhook)
accepts its signatures, so both sides are checked against the reference, not only each other.
"""
from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sendgrid.helpers.eventwebhook import EventWebhook

from bot.channels.email.signature import (SIGNATURE_HEADER, TIMESTAMP_HEADER, InvalidPublicKey, Refusal,
                                          load_public_key, verify)
from bot.channels.email.webhook_events import BadBatch, parse_batch, parse_event
from bot.devtools.sendgrid_simulator import dev_private_key, public_key_text, sign
from bot.vocabulary import MessageStatus

KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC = public_key_text(KEY)
NOW = 1_700_000_000
BODY = json.dumps([{"email": "ada@example.com", "timestamp": NOW, "event": "delivered",
                    "sg_event_id": "ev-1", "sg_message_id": "abc.filter.0", "message_id": "m1"}]).encode()


def headers_for(body: bytes, timestamp: int = NOW, key: ec.EllipticCurvePrivateKey = KEY) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign(key, timestamp, body), TIMESTAMP_HEADER: str(timestamp)}


def check(headers, body=BODY, now=NOW):
    return verify(load_public_key(PUBLIC), headers, body, now=now)


# ------------------------------------------------------------------ the key


def test_the_public_key_is_sendgrids_base64_der_and_loads_with_or_without_armour():
    assert PUBLIC.startswith("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE")  # as SendGrid's settings page shows it
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert load_public_key(pem).public_numbers() == load_public_key(PUBLIC).public_numbers()


@pytest.mark.parametrize("value", ["", "not base64!", base64.b64encode(b"not der").decode(),
                                   base64.b64encode(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
                                       serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)).decode(),
                                   public_key_text(ec.generate_private_key(ec.SECP384R1()))])
def test_anything_but_a_p256_public_key_is_a_configuration_error(value):
    with pytest.raises(InvalidPublicKey):
        load_public_key(value)


def test_the_development_key_is_the_same_in_every_process():
    assert public_key_text(dev_private_key("token")) == public_key_text(dev_private_key("token"))
    assert public_key_text(dev_private_key("token")) != public_key_text(dev_private_key("other"))


# ------------------------------------------------------------------ verdicts


def test_a_valid_signature_passes_and_sendgrids_own_verifier_agrees():
    headers = headers_for(BODY)
    assert check(headers).ok
    reference = EventWebhook(PUBLIC)
    assert reference.verify_signature(BODY.decode(), headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER])


def test_a_forged_signature_is_refused():
    impostor = ec.generate_private_key(ec.SECP256R1())
    assert check(headers_for(BODY, key=impostor)) == (False, Refusal.FORGED)


def test_an_altered_body_is_refused():
    headers = headers_for(BODY)
    assert check(headers, BODY.replace(b"delivered", b"bounce")) == (False, Refusal.FORGED)


def test_a_signature_for_another_timestamp_is_refused():
    headers = headers_for(BODY)
    headers[TIMESTAMP_HEADER] = str(NOW + 1)
    assert check(headers, now=NOW + 1) == (False, Refusal.FORGED)


def test_the_json_re_serialized_from_the_parsed_body_is_refused():
    """The signature covers the raw bytes: verifying json.dumps(json.loads(body)) is the common
    user bug, and a body that was re-serialized on the way is not what SendGrid signed."""
    raw = b'[{"event":"delivered","sg_event_id":"ev-1","email":"ada@example.com","timestamp":1700000000}]'
    headers = headers_for(raw)
    assert check(headers, raw).ok
    reserialized = json.dumps(json.loads(raw)).encode()
    assert reserialized != raw and json.loads(reserialized) == json.loads(raw)
    assert check(headers, reserialized) == (False, Refusal.FORGED)


@pytest.mark.parametrize("age", [301, 3600, -301])
def test_a_stale_or_future_timestamp_is_refused_even_when_signed(age):
    headers = headers_for(BODY, timestamp=NOW - age)
    assert check(headers) == (False, Refusal.STALE)


def test_within_five_minutes_passes():
    assert check(headers_for(BODY, timestamp=NOW - 299)).ok


@pytest.mark.parametrize("headers, refusal", [
    ({}, Refusal.MISSING),
    ({SIGNATURE_HEADER: "abc"}, Refusal.MISSING),
    ({TIMESTAMP_HEADER: str(NOW)}, Refusal.MISSING),
    ({SIGNATURE_HEADER: "not base64 %%%", TIMESTAMP_HEADER: str(NOW)}, Refusal.MALFORMED),
    ({SIGNATURE_HEADER: "AAAA", TIMESTAMP_HEADER: "soon"}, Refusal.MALFORMED),
    ({SIGNATURE_HEADER: "AAAA", TIMESTAMP_HEADER: "1e9"}, Refusal.MALFORMED),
    ({SIGNATURE_HEADER: "AAAA", TIMESTAMP_HEADER: "9" * 40}, Refusal.MALFORMED),
    ({SIGNATURE_HEADER: base64.b64encode(b"\x00" * 70).decode(), TIMESTAMP_HEADER: str(NOW)}, Refusal.FORGED),
])
def test_missing_or_malformed_headers_are_refused_never_raised(headers, refusal):
    assert check(headers) == (False, refusal)


def test_the_clock_is_the_default_now():
    stamp = int(time.time())
    assert verify(load_public_key(PUBLIC), headers_for(BODY, stamp), BODY).ok


# ------------------------------------------------------------------ the event parser

T = datetime.fromtimestamp(NOW, tz=timezone.utc)


def event(name, **fields):
    return {"email": "ada@example.com", "timestamp": NOW, "event": name, "sg_event_id": f"id-{name}",
            "sg_message_id": "xyz.filter.0", "smtp-id": "<xyz@sg>", "message_id": "m1", **fields}


@pytest.mark.parametrize("raw, status, opt_out", [
    (event("processed"), MessageStatus.ACCEPTED, False),
    (event("delivered", response="250 OK"), MessageStatus.DELIVERED, False),
    (event("bounce", reason="550 no such user", status="5.1.1", type="bounce"), MessageStatus.FAILED, False),
    (event("dropped", reason="Bounced Address"), MessageStatus.FAILED, False),
    (event("open", useragent="x"), MessageStatus.READ, False),
    (event("deferred", response="421 try later", attempt="1"), None, False),
    (event("click", url="https://x.example"), None, False),
    (event("spamreport"), None, True),
    (event("unsubscribe"), None, True),
    (event("group_unsubscribe", asm_group_id=1), None, True),
    (event("group_resubscribe", asm_group_id=1), None, False),
    (event("some_new_event"), None, False),
    (event("DELIVERED"), MessageStatus.DELIVERED, False),
])
def test_each_event_maps_onto_our_statuses(raw, status, opt_out):
    parsed = parse_event(raw)
    assert parsed.usable and parsed.problem is None
    assert (parsed.status, parsed.opt_out) == (status, opt_out)
    assert (parsed.message_id, parsed.sg_event_id, parsed.sg_message_id) == ("m1", raw["sg_event_id"], "xyz.filter.0")
    assert (parsed.email, parsed.timestamp) == ("ada@example.com", T)


def test_reasons_are_kept_without_addresses():
    bounce = parse_event(event("bounce", reason="550 5.1.1 <ada@example.com>: Recipient address rejected",
                               status="5.1.1", type="blocked"))
    assert bounce.reason == "550 5.1.1 <<address>>: Recipient address rejected"
    assert (bounce.smtp_status, bounce.bounce_type) == ("5.1.1", "blocked")
    assert parse_event(event("dropped", reason="Unsubscribed Address")).reason == "Unsubscribed Address"
    assert parse_event(event("deferred", response="421 busy")).reason == "421 busy"
    assert parse_event(event("delivered", response="250 OK")).reason is None


@pytest.mark.parametrize("raw, problem", [
    ("a string", "not an object"), (None, "not an object"), ([1], "not an object"),
    ({"event": "delivered"}, "no sg_event_id"),
    ({"event": "delivered", "sg_event_id": ["x"]}, "no sg_event_id"),
    ({"sg_event_id": "e1"}, "no event name"),
    ({"sg_event_id": "e1", "event": 7}, "no event name"),
    ({"sg_event_id": "e1", "event": "unsubscribe"}, "an opt-out without an email address"),
])
def test_odd_events_are_unusable_never_raised(raw, problem):
    parsed = parse_event(raw)
    assert not parsed.usable and parsed.problem == problem
    assert parsed.status is None and not parsed.opt_out


@pytest.mark.parametrize("fields, message_id, timestamp", [
    ({"message_id": 17}, "17", T), ({"message_id": None}, None, T), ({"message_id": {"a": 1}}, None, T),
    ({"timestamp": str(NOW)}, "m1", T), ({"timestamp": "soon"}, "m1", None), ({"timestamp": True}, "m1", None),
    ({"timestamp": 10 ** 20}, "m1", None), ({"timestamp": float("nan")}, "m1", None),
])
def test_wrong_types_in_optional_fields_are_dropped(fields, message_id, timestamp):
    parsed = parse_event(event("delivered", **fields))
    assert parsed.usable and (parsed.message_id, parsed.timestamp) == (message_id, timestamp)


def test_an_event_without_our_custom_arg_is_usable_with_no_message_id():
    raw = event("delivered")
    del raw["message_id"]
    assert parse_event(raw).usable and parse_event(raw).message_id is None


def test_a_batch_keeps_its_order_and_its_odd_events():
    parsed = parse_batch(json.dumps([event("processed"), 3, event("delivered")]).encode())
    assert [(p.event, p.usable) for p in parsed] == [("processed", True), ("", False), ("delivered", True)]


@pytest.mark.parametrize("body", [b"", b"not json", b'{"event": "delivered"}', b'"x"', b"\xff\xfe"])
def test_a_body_that_is_not_a_json_array_is_a_bad_batch(body):
    with pytest.raises(BadBatch):
        parse_batch(body)


def test_text_no_database_can_hold_is_dropped_from_an_event() -> None:
    from bot.channels.email.webhook_events import parse_event

    event = parse_event({"sg_event_id": "a\x00b", "event": "bounce\x00", "reason": "bad\x00\ud800 box",
                         "email": "x@example.com"})
    assert event.usable and event.sg_event_id == "ab" and event.event == "bounce"
    assert "\x00" not in event.reason and "\ud800" not in event.reason
