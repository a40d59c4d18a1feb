"""`python -m bot.doctor`: check a configuration and explain each problem before deploying.

It reads the same settings as the server (environment and .env) but does not need them to be
valid: every problem is reported, with what to do about it, instead of the first one crashing.
Exit status 1 when something would stop the server or lose messages, else 0.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

from bot.devmode import is_loopback_url

OK, WARN, FAIL = "ok", "warn", "fail"
_MARKS = {OK: "✓", WARN: "!", FAIL: "✗"}


@dataclass(frozen=True)
class Check:
    status: str
    title: str
    advice: str = ""

    def render(self) -> str:
        text = f"{_MARKS[self.status]} {self.title}"
        return text + (f"\n    {self.advice}" if self.advice else "")


def run_checks(env_file: str | None = ".env") -> list[Check]:
    """Every check, in order; never raises."""
    from bot.devmode import production_signals, with_dev_defaults
    from bot.config import ConfigError, REQUIRED_SECRETS, database_uri, load_settings, missing_secrets
    from bot.devmode import DEV_SENDER, default_instance_path

    try:
        settings = load_settings(env_file=env_file)
    except ConfigError as exc:
        return [Check(FAIL, "the configuration does not load", str(exc))]

    checks: list[Check] = []
    instance_path = os.path.abspath(settings.instance_path) if settings.instance_path else default_instance_path()
    dev_mode = not production_signals(settings)
    if dev_mode:
        settings = with_dev_defaults(settings, instance_path)
        checks.append(Check(WARN, "development mode: no Twilio credentials, the bundled simulator stands in",
                            "Set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_WHATSAPP_NUMBER to talk to "
                            "Twilio; production never runs in this mode."))
    for name in missing_secrets(settings):
        checks.append(Check(FAIL, f"{name} is not set", _WHY_REQUIRED[name]))
    if not dev_mode and not missing_secrets(settings):
        checks.append(Check(OK, "required variables are set: " + ", ".join(REQUIRED_SECRETS)))

    checks += _webhook_checks(settings.twilio_webhook_url, production=not dev_mode)
    if not dev_mode and settings.twilio_whatsapp_number == DEV_SENDER:
        checks.append(Check(WARN, "TWILIO_WHATSAPP_NUMBER is the Twilio sandbox",
                            "Only people who sent 'join <code>' (within 3 days) receive messages, and only "
                            "sample templates work. Use your approved WhatsApp sender in production."))
    token = settings.notify_api_token.get_secret_value() if settings.notify_api_token else ""
    if token and len(token) < 16:
        checks.append(Check(WARN, "NOTIFY_API_TOKEN is short",
                            "Use a long random token: python3 -c \"import secrets; print(secrets.token_urlsafe(32))\""))

    checks.append(_check(lambda: _database(database_uri(settings.database_url, instance_path)),
                         "database", "DATABASE_URL"))
    # On a dyno each process has its own ephemeral disk: a SQLite file is neither shared between
    # web and worker nor kept across restarts. On one machine of your own it is merely a choice.
    on_dyno = bool(os.environ.get("DYNO"))
    if not settings.database_url and not dev_mode:
        checks.append(Check(FAIL if on_dyno else WARN,
                            "DATABASE_URL is not set: the data is a SQLite file under instance/",
                            "Web and worker dynos do not share a disk, and a dyno's disk is wiped on restart: "
                            "attach PostgreSQL (it sets DATABASE_URL)." if on_dyno else
                            "Fine when web and worker run on this one machine; use PostgreSQL when they don't."))
    if settings.redis_url:
        checks.append(_check(lambda: _redis(settings.redis_url), "Redis queue", "REDIS_URL"))
    elif not dev_mode:
        checks.append(Check(FAIL if on_dyno else WARN,
                            "REDIS_URL is not set: the queue is a SQLite file under instance/",
                            "Web and worker dynos do not share a disk: attach Redis (it sets REDIS_URL)."
                            if on_dyno else
                            "Fine on one machine; web and worker on separate machines need Redis."))
    if not missing_secrets(settings):
        checks.append(_twilio_check(settings, dev_mode))
    return checks


_WHY_REQUIRED = {
    "TWILIO_ACCOUNT_SID": "Your Account SID (AC...) from the Twilio console's Account info.",
    "TWILIO_AUTH_TOKEN": "The auth token next to it: it authenticates API calls and verifies webhook signatures.",
    "TWILIO_WHATSAPP_NUMBER": "The WhatsApp sender, e.g. whatsapp:+14155238886 for the sandbox.",
    "NOTIFY_API_TOKEN": "The bearer token your backend sends to /notify; generate a long random one.",
}


def _webhook_checks(url: str | None, *, production: bool) -> list[Check]:
    if not url:
        return [Check(WARN if not production else FAIL, "TWILIO_WEBHOOK_URL is not set",
                      "Set it to the public URL of /twilio/webhook (e.g. https://your-app.example.com/twilio/"
                      "webhook): signatures are checked against it and it is every message's StatusCallback; "
                      "without it no delivery status comes back.")]
    parsed = urlparse(url)
    checks = []
    local = is_loopback_url(url)
    if production and (parsed.scheme != "https" or local):
        checks.append(Check(FAIL, f"TWILIO_WEBHOOK_URL is not a public https URL ({parsed.scheme}://{parsed.hostname})",
                            "Twilio must reach it from the internet over https: your app's domain in production, "
                            "a tunnel (cloudflared, ngrok) for the sandbox."))
    if not parsed.path.endswith("/twilio/webhook"):
        checks.append(Check(WARN, "TWILIO_WEBHOOK_URL does not end with /twilio/webhook",
                            "Fine behind a rewriting proxy; otherwise Twilio's requests will not reach the bot."))
    if not checks:
        checks.append(Check(OK, f"TWILIO_WEBHOOK_URL is {parsed.scheme}://{parsed.netloc}{parsed.path}"))
    return checks


class _Unmigrated(RuntimeError):
    """The database answers but the release step (migrations) has not run."""


def _check(probe: Callable[[], str], what: str, variable: str) -> Check:
    try:
        return Check(OK, f"{what}: {probe()}")
    except _Unmigrated as exc:
        return Check(FAIL, f"{what} schema is out of date", str(exc))
    except Exception as exc:  # the message may hold a URL with a password: report the kind only
        return Check(FAIL, f"{what} is unreachable ({type(exc).__name__})",
                     f"Check {variable}: the host, port, credentials, and that the service is running.")


def _database(uri: str) -> str:
    import sqlalchemy as sa
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.config import Config

    from bot.database import MIGRATIONS_DIR

    engine = sa.create_engine(uri, connect_args={"connect_timeout": 5} if uri.startswith("postgresql") else {})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    config = Config()
    config.set_main_option("script_location", MIGRATIONS_DIR)
    head = ScriptDirectory.from_config(config).get_current_head()
    if current != head:
        raise _Unmigrated(f"schema at {current or 'nothing'}, code expects {head}: run `flask --app wsgi db upgrade`")
    return f"reachable, migrations up to date ({head})"


def _redis(url: str) -> str:
    import redis

    redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5).ping()
    return "reachable"


def _twilio_check(settings, dev_mode: bool) -> Check:
    from twilio.base.exceptions import TwilioException

    from bot.channels.whatsapp.client import build_client

    sid = settings.twilio_account_sid
    client = build_client(sid, settings.twilio_auth_token.get_secret_value(), settings.twilio_api_url, 10)
    where = "the simulator" if dev_mode else "Twilio"
    try:
        account = client.api.v2010.accounts(sid).fetch()
    except TwilioException as exc:
        if getattr(exc, "status", None) in (401, 403):
            return Check(FAIL, f"{where} refused the credentials (HTTP {exc.status}, code {getattr(exc, 'code', '?')})",
                         "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be a matching pair from the console "
                         "(a rotated token invalidates the old one).")
        return Check(FAIL, f"{where} answered with an error (HTTP {getattr(exc, 'status', '?')})",
                     "Try again; if it persists, check status.twilio.com.")
    except Exception as exc:
        advice = ("Start it: `python -m bot.devtools.simulator` (bin/dev starts it for you)." if dev_mode
                  else f"Check TWILIO_API_URL ({settings.twilio_api_url}) and the network.")
        return Check(FAIL, f"cannot reach {where} ({type(exc).__name__})", advice)
    return Check(OK, f"{where} accepts the credentials (account status: {account.status})")


def main(argv: list[str] | None = None) -> int:
    """Print every check; exit 1 if any failed."""
    checks = run_checks()
    for check in checks:
        print(check.render())
    failed = sum(1 for c in checks if c.status == FAIL)
    print(f"\n{failed} problem(s)" if failed else "\nNo problems found.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
