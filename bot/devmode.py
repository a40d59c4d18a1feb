"""Zero-configuration development: no Twilio account, the bundled simulator instead.

With no Twilio account configured (no TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN or
TWILIO_WHATSAPP_NUMBER, no public webhook or API URL, not on a Heroku dyno: see
`bot.production_signals`), the server talks to `python -m bot.devtools.simulator` on 127.0.0.1 and uses
development secrets generated once and kept in instance/dev-secrets.json, shared by web,
worker, simulator and chat.
Setting any of those leaves this mode for good: every real secret is then required.
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

DEV_SENDER = "whatsapp:+14155238886"  # the Twilio sandbox's number, so copy reads the same
DEV_WEBHOOK_URL = "http://127.0.0.1:5000/twilio/webhook"
SECRETS_FILE = "dev-secrets.json"


def is_loopback_url(url: str) -> bool:
    """Whether `url` points at this machine (localhost, 127.x.x.x, ::1)."""
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


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
    return f"http://127.0.0.1:{simulator_port()}"


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
