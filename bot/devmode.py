"""Zero-configuration development: no Twilio or SendGrid account, the bundled simulator instead.

With no Twilio account configured (no TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN or
TWILIO_WHATSAPP_NUMBER, no public webhook or API URL, not on a Heroku dyno: see
`production_signals`), the server talks to `python -m bot.devtools.simulator` on 127.0.0.1 and uses
development secrets generated once and kept in instance/dev-secrets.json, shared by web,
worker, simulator and chat. The simulator also plays SendGrid: with no SENDGRID_API_KEY, email
goes there too, with a key and an Event Webhook key pair derived from the development auth
token (so no secrets file needs new entries, and a simulator started apart agrees on them).
Setting any of those leaves this mode for good: every real secret is then required.

Nothing here imports bot.devtools: the servers never load the development tools
(tests/test_packaging.py); the simulator imports the derivations from here instead.
"""
from __future__ import annotations

import ipaddress
import json
import os
import base64
import hashlib
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import SecretStr

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from bot.config import Settings

DEV_SENDER = "whatsapp:+14155238886"  # the Twilio sandbox's number, so copy reads the same
DEV_WEBHOOK_URL = "http://127.0.0.1:5000/twilio/webhook"
#: The development email sender: example.com is reserved (RFC 2606), so no real mailbox is named.
DEV_EMAIL_FROM = "The Bot (development) <bot@example.com>"
#: Where SendGrid's Event Webhook posts, on the web (bot/http/email_hooks.py).
SENDGRID_EVENTS_PATH = "/sendgrid/events"
SECRETS_FILE = "dev-secrets.json"

#: The variables that name a Twilio account: any one of them means "talk to Twilio".
TWILIO_IDENTITY = ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER")


def dev_mode_requested(settings: "Settings", test_config: dict[str, Any] | None) -> bool:
    """Development mode: nothing says this is a real deployment (see production_signals), and
    never silently in tests (a test asks for it with DEV_MODE=True)."""
    if test_config is not None:
        return bool(test_config.get("DEV_MODE"))
    return not production_signals(settings)


def production_signals(settings: "Settings") -> list[str]:
    """What marks a real deployment, where a missing secret must stop start-up instead of
    falling back to the simulator: any Twilio identity, a public webhook or API URL, a database
    or Redis on another host, a dyno."""
    signals = [name for name in TWILIO_IDENTITY if getattr(settings, name.lower())]
    if settings.twilio_webhook_url and not is_loopback_url(settings.twilio_webhook_url):
        signals.append("TWILIO_WEBHOOK_URL")
    if "twilio_api_url" in settings.model_fields_set and not is_loopback_url(settings.twilio_api_url):
        signals.append("TWILIO_API_URL")
    for name, url in (("DATABASE_URL", settings.database_url), ("REDIS_URL", settings.redis_url)):
        if url and not url.startswith("sqlite") and not is_loopback_url(url):
            signals.append(name)  # a database or Redis on another host is somebody's deployment
    if os.environ.get("DYNO"):
        signals.append("DYNO")
    return signals


def with_dev_defaults(settings: "Settings", instance_path: str) -> "Settings":
    """Settings for the simulator: development secrets, the sandbox sender, local URLs."""
    secrets_ = dev_secrets(instance_path)
    updates: dict[str, Any] = {
        "twilio_account_sid": secrets_["TWILIO_ACCOUNT_SID"],
        "twilio_auth_token": SecretStr(secrets_["TWILIO_AUTH_TOKEN"]),
        "twilio_whatsapp_number": settings.twilio_whatsapp_number or DEV_SENDER,
        "twilio_webhook_url": settings.twilio_webhook_url or dev_webhook_url(),
    }
    if "twilio_api_url" not in settings.model_fields_set:
        updates["twilio_api_url"] = simulator_url()
    if not settings.notify_api_token:
        updates["notify_api_token"] = SecretStr(secrets_["NOTIFY_API_TOKEN"])
    if not settings.events_webhook_url:
        # Events go to the simulator, which verifies each signature as a receiver would.
        updates["events_webhook_url"] = simulator_url() + SIMULATOR_EVENTS_PATH
        updates["events_webhook_secret"] = SecretStr(dev_events_secret(secrets_["TWILIO_AUTH_TOKEN"]))
    if not settings.secret_key:
        digest = hashlib.sha256(b"secret-key:" + secrets_["TWILIO_AUTH_TOKEN"].encode()).hexdigest()
        updates["secret_key"] = SecretStr(digest)
    if settings.sendgrid_api_key is None:
        # Email through the simulator's SendGrid side, as a group: a SendGrid key of your own
        # keeps every email setting as you gave it (a real key sent to the simulator would only
        # be refused, and the emails held).
        seed = secrets_["TWILIO_AUTH_TOKEN"]
        updates["sendgrid_api_key"] = SecretStr(dev_api_key(seed))
        if "sendgrid_api_url" not in settings.model_fields_set:
            updates["sendgrid_api_url"] = simulator_url()
        updates["email_from"] = settings.email_from or DEV_EMAIL_FROM
        updates["sendgrid_webhook_public_key"] = (settings.sendgrid_webhook_public_key
                                                  or public_key_text(dev_private_key(seed)))
    return settings.model_copy(update=updates)


#: Where the simulator receives events in development mode.
SIMULATOR_EVENTS_PATH = "/_events"


def dev_events_secret(auth_token: str) -> str:
    """The development events secret, derived from the development auth token: the simulator
    (which knows that token) verifies with the same one, and no secrets file needs a new key."""
    digest = hashlib.sha256(b"events-webhook:" + auth_token.encode()).digest()
    return "whsec_" + base64.b64encode(digest).decode()


def dev_api_key(seed: str) -> str:
    """The development SENDGRID_API_KEY derived from `seed` (the development Twilio auth token):
    the server and a simulator started apart agree on it without another secret."""
    return "SG." + hashlib.sha256(b"sendgrid-api-key\x00" + seed.encode()).hexdigest()


def dev_private_key(seed: str) -> "ec.EllipticCurvePrivateKey":
    """A deterministic P-256 key from `seed`, so the server (which needs only the public half,
    `public_key_text`) and a simulator started apart agree on it in development mode."""
    # Imported here: only development mode derives keys, and cryptography costs each web
    # process megabytes it never needs otherwise (bench/THROUGHPUT.md, "The web's hot path").
    from cryptography.hazmat.primitives.asymmetric import ec

    digest = hashlib.sha256(b"sendgrid-event-webhook-key\x00" + seed.encode()).digest()
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's group order
    return ec.derive_private_key(int.from_bytes(digest, "big") % (order - 1) + 1, ec.SECP256R1())


def public_key_text(private_key: "ec.EllipticCurvePrivateKey") -> str:
    """The public half as SendGrid's settings page shows it: base64 DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def is_loopback_url(url: str) -> bool:
    """Whether `url` points at this machine (localhost, 127.x.x.x, ::1)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:  # an address, parsed: "127.db.example.com" is a name, not 127.0.0.0/8
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_instance_path() -> str:
    """Where create_app keeps instance/ (INSTANCE_PATH, else Flask's default for this package),
    so the simulator and the doctor find the same development secrets from any directory."""
    configured = os.environ.get("INSTANCE_PATH")
    if configured:
        return os.path.abspath(configured)
    from flask import Flask

    return Flask("bot").instance_path


def simulator_port() -> int:
    """The simulator's port: SIMULATOR_PORT, default 8081."""
    return int(os.environ.get("SIMULATOR_PORT") or 8081)


def simulator_url() -> str:
    """The simulator's base URL (Twilio's and SendGrid's APIs both): http://127.0.0.1:<port>."""
    return f"http://127.0.0.1:{simulator_port()}"


def dev_web_url() -> str:
    """The web's base URL in development mode: DEV_WEB_URL, else http://127.0.0.1:5000.

    bin/dev sets DEV_WEB_URL from PORT: honcho gives each Procfile process a PORT of its own
    (web 5000, worker 5100, simulator 5200), so the simulator cannot read the web's from PORT.
    """
    return (os.environ.get("DEV_WEB_URL") or "http://127.0.0.1:5000").rstrip("/")


def dev_webhook_url() -> str:
    """The web's /twilio/webhook in development mode (DEV_WEBHOOK_URL on the default port)."""
    return dev_web_url() + "/twilio/webhook"


def dev_secrets(instance_path: str) -> dict[str, str]:
    """The development secrets, created on first use; every process reads the same file.

    Created with O_EXCL semantics (a hard link of a finished temp file), so web, worker and
    simulator starting at once agree on one set of secrets.
    """
    folder = Path(instance_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRETS_FILE
    if not path.exists():
        fresh = {
            "TWILIO_ACCOUNT_SID": "AC" + secrets.token_hex(16),
            "TWILIO_AUTH_TOKEN": secrets.token_hex(16),
            "NOTIFY_API_TOKEN": secrets.token_urlsafe(24),
        }
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".dev-secrets-")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(fresh, handle, indent=2)
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: use its secrets
        finally:
            os.unlink(tmp)
    return json.loads(path.read_text())
