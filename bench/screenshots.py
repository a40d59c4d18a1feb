"""Screenshots of every dashboard page, written to docs/screenshots/ (the README shows them).

    .venv/bin/python bench/screenshots.py            # needs the test extra and /usr/bin/chromium

A throw-away instance (SQLite files in a temporary folder, the bundled Twilio simulator), a day
of traffic made through the real paths (tests/dashboard/scenario.py), the app served on
127.0.0.1, and the system's Chromium signed in as an operator, on a laptop's screen and a phone's.
"""
from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flask_migrate import upgrade  # noqa: E402

from bot import create_app  # noqa: E402
from bot.dashboard import accounts  # noqa: E402
from bot.delivery.queue import huey  # noqa: E402
from bot.devmode import SIMULATOR_EVENTS_PATH, dev_events_secret  # noqa: E402
from bot.devtools.sendgrid_simulator import public_key_text  # noqa: E402
from bot.devtools.simulator import TwilioSimulator  # noqa: E402
from bot.extensions import db  # noqa: E402
from tests.conftest import (ACCOUNT_SID, API_TOKEN, AUTH_TOKEN, CONTENT_SIDS, EMAIL_FROM, SENDER,  # noqa: E402
                            WEBHOOK_URL)
from tests.dashboard.browser import chromium, chromium_path, serving  # noqa: E402
from tests.dashboard.scenario import make_day  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
EMAIL, PASSWORD = "ops@example.com", "screenshots only " + uuid.uuid4().hex
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def main() -> int:
    path = chromium_path()
    if path is None:
        print("no Chromium found (apt-get install -y chromium, or set CHROMIUM_PATH)", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        app = create_app({
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_WHATSAPP_NUMBER": SENDER,
            "TWILIO_WEBHOOK_URL": WEBHOOK_URL, "TWILIO_API_URL": twilio.url, "TWILIO_CONTENT_SIDS": CONTENT_SIDS,
            "NOTIFY_API_TOKEN": API_TOKEN, "SENDGRID_API_KEY": twilio.sendgrid.api_key,
            "SENDGRID_API_URL": twilio.url, "EMAIL_FROM": EMAIL_FROM,
            "SENDGRID_WEBHOOK_PUBLIC_KEY": public_key_text(twilio.sendgrid.private_key),
            "SECRET_KEY": uuid.uuid4().hex, "INSTANCE_PATH": folder, "QUEUE_NAME": "screenshots",
            "TESTING": True, "SESSION_COOKIE_SECURE": False,
            # Events pushed to the simulator's receiver, as in development mode (Replay buttons shown).
            "EVENTS_WEBHOOK_URL": twilio.url + SIMULATOR_EVENTS_PATH, "EVENTS_WEBHOOK_SECRET": dev_events_secret(AUTH_TOKEN),
        })
        with app.app_context():
            upgrade()
            accounts.create_operator(EMAIL, PASSWORD)
            db.session.commit()
        day = make_day(app, twilio)
        pages = {
            "messages": "/dashboard/",
            "message": f"/dashboard/messages/{day.failed_id}",
            "failures": "/dashboard/failures",
            "events": "/dashboard/events",
            "handoff": "/dashboard/handoff",
            "conversations": "/dashboard/conversations",
        }
        with serving(app) as url, chromium(path) as browser:
            for device, viewport in (("laptop", LAPTOP), ("phone", PHONE)):
                context = browser.new_context(viewport=viewport, device_scale_factor=1)
                page = context.new_page()
                page.goto(url + "/dashboard/sign-in")
                if device == "laptop":
                    page.screenshot(path=str(OUT / "sign-in.png"))
                page.fill("input[name=email]", EMAIL)
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(url + "/dashboard/")
                for name, target in pages.items():
                    if device == "phone" and name not in ("messages", "message", "handoff"):
                        continue
                    page.goto(url + target)
                    file = OUT / (f"{name}.png" if device == "laptop" else f"{name}-phone.png")
                    page.screenshot(path=str(file), full_page=True)
                    print(file.relative_to(ROOT))
                context.close()
        huey.flush()
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
