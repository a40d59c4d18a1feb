"""Settings: one typed object read from the environment (and `.env` in development).

The variable names are docs/configuration.md's, so a Heroku-style host configures the app with
nothing but environment variables. Secrets are `SecretStr`, so printing the settings never prints
them, and validation errors are rewritten to name the variable without echoing its value.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from bot.locales import normalise
from bot.phone import InvalidNumber, normalize_whatsapp_address

#: Variables without which the server cannot talk to Twilio or authenticate a backend.
REQUIRED_SECRETS = ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER", "NOTIFY_API_TOKEN")
#: Largest request body accepted; Twilio's webhooks and /notify bodies are a few kilobytes.
MAX_CONTENT_LENGTH = 256 * 1024
#: The Procfile's `${WORKER_THREADS:-…}` default, the same number (tests/test_packaging.py checks).
WORKER_THREADS_DEFAULT = 8
SEND_CONCURRENCY_DEFAULT = 64
SEND_BATCH_DEFAULT = 50


class ConfigError(RuntimeError):
    """The configuration cannot start a server; the message names the variables to fix."""


class Settings(BaseSettings):
    """Everything the app reads from its environment."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_whatsapp_number: str | None = None
    twilio_webhook_url: str | None = None
    twilio_api_url: str = "https://api.twilio.com"
    #: Seconds per Twilio API call (connect, then read). At most 10: a send on the wire when the
    #: worker is told to stop must end inside its shutdown timeout (the Procfile's 25 s).
    twilio_timeout: float = Field(default=10.0, gt=0, le=10)
    #: The sender's allowed rate (80 by default; 400 for an upgraded text sender), shared by
    #: every worker process through Redis.
    twilio_messages_per_second: int = Field(default=80, ge=1, le=1000)
    #: Approved WhatsApp templates: JSON object mapping a template name to its ContentSid (HX...),
    #: the DEFAULT_LOCALE's, or to an object of locale -> ContentSid (each HX SID is one language;
    #: bot/locales.py resolves a user's locale among them).
    twilio_content_sids: Annotated[dict[str, str | dict[str, str]], NoDecode] = Field(default_factory=dict)
    notify_api_token: SecretStr | None = None
    database_url: str | None = None
    redis_url: str | None = None
    #: How the bot names itself in its messages.
    bot_name: str = "the bot"
    #: The locale of the copy outside locale folders and of a bare ContentSid, and the last step
    #: of a user's locale resolution (exact, its language, this): bot/locales.py.
    default_locale: str = "en"
    #: Global keywords, comma-separated (add other languages: "STOP,ALTO,ARRET"). Compared
    #: with the whole message, case-folded, trimmed and without punctuation.
    opt_out_keywords: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"])
    opt_in_keywords: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["START", "YES", "UNSTOP"])
    help_keywords: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["HELP", "INFO"])
    #: Quick-reply payloads that opt out (e.g. a marketing template's "Stop promotions" button).
    #: Payloads, not labels: a button labelled "Cancel" answers a question and unsubscribes nobody.
    opt_out_button_payloads: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["STOP", "STOPALL", "UNSUBSCRIBE", "OPTOUT", "OPT_OUT"])
    #: Where the embedded SQLite database and queue live (default: ./instance).
    instance_path: str | None = None
    #: Huey queue name; two bots can share one Redis with different names.
    queue_name: str = "whatsapp-bot"
    #: The worker's threads (the Procfile passes the same variable to huey_consumer): tasks run
    #: at once (turns, send batches). The default is measured: bench/THROUGHPUT.md.
    worker_threads: int = Field(default=WORKER_THREADS_DEFAULT, ge=1, le=1024)
    #: Twilio calls in flight at once per worker process (a pool shared by its threads; also its
    #: keep-alive connections to Twilio), and how many due messages one send task claims and
    #: sends together. Measured defaults: bench/THROUGHPUT.md.
    send_concurrency: int = Field(default=SEND_CONCURRENCY_DEFAULT, ge=1, le=1000)
    send_batch: int = Field(default=SEND_BATCH_DEFAULT, ge=1, le=500)
    #: Broadcasts (docs/delivery.md, "Broadcasts"): the share of each sender's rate their messages
    #: may use (the rest stays free for conversations and /notify: invariant 16), and how many
    #: audience entries the worker resolves per transaction (its memory is bounded by this).
    broadcast_rate_share: float = Field(default=0.8, gt=0, le=1)
    broadcast_batch: int = Field(default=1000, ge=10, le=10000)
    #: A turn's replies go straight to the worker's sender once the turn commits, when one of its
    #: hand-over threads is free, instead of through the queue (docs/delivery.md, "The turn").
    #: Off: every reply takes the queue (the tests' default, which drive the queue by hand).
    hand_over_replies: bool = True
    #: Threads of the worker that run a broadcast's work (its send batches, its pump turns) so it
    #: never holds the huey threads turns need (bot/delivery/bulk_lane.py; invariant 16).
    #: 0: on huey's threads (the tests' default, which drive the queue by hand).
    bulk_lane_threads: int = Field(default=6, ge=0, le=64)
    #: On Redis, a broadcast's work runs in a process of its own, which the worker starts as its
    #: child (bot/delivery/bulk_process.py): its own interpreter and a lower CPU priority, so turns
    #: and replies neither share its GIL nor wait for the CPU behind it (invariant 16). Off, or on
    #: the SQLite default: the bulk lane's threads in the worker process, as above.
    bulk_worker_process: bool = True
    #: Huey threads of that process: a broadcast's send batches and pump turns run on them.
    bulk_worker_threads: int = Field(default=6, ge=1, le=64)
    #: Which queue this process consumes: set to "bulk" by the worker for its bulk process, never
    #: by hand ("main": the Procfile's worker).
    bot_queue_lane: Literal["main", "bulk"] = "main"
    #: Database connections each process keeps (plus DATABASE_MAX_OVERFLOW at peaks). A send
    #: holds one only while it reads or records, never while it waits for Twilio, so far fewer
    #: connections than threads suffice.
    database_pool_size: int = Field(default=5, ge=1, le=200)
    database_max_overflow: int = Field(default=5, ge=0, le=200)
    #: Reconciliation (bot/delivery/reconcile.py): an outbound message that has sat this long in a
    #: status short of final (its callback lost) has its status fetched from Twilio, and again
    #: at most this often while it stays there (for 3 days).
    reconcile_after_minutes: int = Field(default=180, ge=1, le=7 * 24 * 60)

    # --- events to the backend (docs/api.md, "Events to your backend") ---
    #: Where the worker POSTs events, signed per Standard Webhooks. Unset: events are stored and
    #: readable (GET /events), not pushed.
    events_webhook_url: str | None = None
    #: The signing secret: "whsec_" + base64 of 24 to 64 random bytes (any Standard Webhooks
    #: library generates one). Required with EVENTS_WEBHOOK_URL.
    events_webhook_secret: SecretStr | None = None
    #: Only these types are pushed (comma-separated, e.g. "message.status,message.received");
    #: empty: all. Every event is stored whatever this says.
    events_types: Annotated[list[str], NoDecode] = Field(default_factory=list)
    events_timeout: float = Field(default=5.0, gt=0, le=15)
    #: Deliveries talking to the receiver at once per worker process: a slow receiver holds at
    #: most these threads, never the ones that send and run turns.
    events_concurrency: int = Field(default=2, ge=1, le=64)
    #: Delivered (and stored) events older than this are deleted; failed ones stay for replay.
    events_retention_days: int = Field(default=30, ge=1, le=3650)
    # --- email through SendGrid (docs/ARCHITECTURE.md, "Users and channels") ---
    #: Unset: no email is sent; a user's email channel is skipped as if they had no address.
    sendgrid_api_key: SecretStr | None = None
    sendgrid_api_url: str = "https://api.sendgrid.com"
    #: The sender, "Name <address>" (a verified sender or domain at SendGrid).
    email_from: str | None = None
    #: The Event Webhook's verification key as SendGrid's settings page shows it (base64 DER).
    sendgrid_webhook_public_key: str | None = None
    #: Emails sent per second (a moving window shared by every worker, as for WhatsApp).
    email_messages_per_second: int = Field(default=100, ge=1, le=10000)
    #: An email whose send may have been accepted (a timeout, a 502/504, a worker killed mid-send)
    #: waits this long for SendGrid's first event about it before it is sent again.
    email_unsure_grace_seconds: float = Field(default=600, ge=1, le=24 * 3600)
    #: Signs the one-click unsubscribe links: keep it stable, or links in old emails stop working.
    #: Required with SENDGRID_API_KEY.
    secret_key: SecretStr | None = None
    #: The server's public base URL (the unsubscribe links); default: TWILIO_WEBHOOK_URL's origin.
    public_url: str | None = None

    # --- metrics (docs/metrics.md) ---
    #: Opens GET /metrics (bearer, or basic with this as the password); unset: /metrics is a 404
    #: and nothing is timed or counted. Set it on the worker too: its counts reach the web's scrape.
    metrics_token: SecretStr | None = None
    #: How often each process adds what it counted to the shared store (Redis, or the SQLite
    #: queue file) that the web's scrape reads.
    metrics_flush_seconds: float = Field(default=5.0, gt=0, le=300)

    # --- human handoff ---
    #: How long a handoff lasts unless DELETE /contacts/<phone>/handoff ends it first.
    handoff_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    #: Words that ask for a person (the whole message, case-folded, without punctuation).
    handoff_keywords: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["AGENT", "HUMAN"])

    # --- scheduled sends and quiet hours (docs/delivery.md, "Held messages") ---
    #: A notification that would arrive inside these hours, in the user's own timezone, is held
    #: until they end (never dropped); e.g. "21:00-08:00". Empty: none. /notify's `quiet_hours`
    #: overrides it per request. Replies in a conversation the user started are never held.
    quiet_hours: str = ""
    #: The timezone (IANA) of a user who has none of their own, for the quiet hours.
    default_timezone: str = "UTC"

    def flask_config(self, instance_path: str) -> dict[str, Any]:
        """The app's config: every setting under its variable's name, secrets unwrapped, and
        what Flask and its extensions read (the SQLAlchemy URI, the request size limit)."""
        config: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            config[name.upper()] = value.get_secret_value() if isinstance(value, SecretStr) else value
        config.update(
            SQLALCHEMY_DATABASE_URI=database_uri(self.database_url, instance_path),
            # hide_parameters: a database error names the statement, never its values (numbers,
            # message bodies) in logs and tracebacks.
            # No pool_pre_ping: bot/database.py pings only connections that sat idle (a round
            # trip per request otherwise).
            SQLALCHEMY_ENGINE_OPTIONS={"pool_size": self.database_pool_size,
                                       "max_overflow": self.database_max_overflow, "hide_parameters": True},
            MAX_CONTENT_LENGTH=MAX_CONTENT_LENGTH,
        )
        return config

    @field_validator("twilio_account_sid")
    @classmethod
    def _account_sid_shape(cls, value: str | None) -> str | None:
        if value and not (value.startswith("AC") and len(value) == 34):
            raise ValueError("must be an Account SID: 'AC' followed by 32 hex characters")
        return value

    @field_validator("twilio_whatsapp_number")
    @classmethod
    def _whatsapp_sender(cls, value: str | None) -> str | None:
        if not value:
            return value
        try:
            return normalize_whatsapp_address(value)
        except InvalidNumber as exc:
            raise ValueError(f"must be a WhatsApp sender like whatsapp:+14155238886 ({exc})") from None

    @field_validator("twilio_webhook_url", "twilio_api_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/") if value and value.endswith("//") else value

    @field_validator("events_webhook_url")
    @classmethod
    def _events_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value or None

    @field_validator("events_webhook_secret")
    @classmethod
    def _events_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        from standardwebhooks.webhooks import Webhook

        raw = value.get_secret_value()
        try:
            if not raw.startswith("whsec_"):
                raise ValueError
            Webhook(raw)
        except Exception:
            raise ValueError("must be a Standard Webhooks secret: 'whsec_' followed by base64") from None
        return value

    @field_validator("events_types", mode="before")
    @classmethod
    def _event_types(cls, value: Any) -> Any:
        from bot.vocabulary import EventType

        if isinstance(value, str):
            value = [word.strip() for word in value.split(",") if word.strip()]
        unknown = [name for name in value or [] if name not in set(EventType)]
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {', '.join(EventType)}")
        return value

    @field_validator("opt_out_keywords", "opt_in_keywords", "help_keywords", "opt_out_button_payloads",
                     "handoff_keywords", mode="before")
    @classmethod
    def _keyword_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [word.strip() for word in value.split(",")]
        if isinstance(value, (list, tuple)):
            value = [str(word).strip() for word in value if str(word).strip()]
            if not value:
                raise ValueError("needs at least one keyword")
        return value

    @field_validator("default_locale")
    @classmethod
    def _default_locale(cls, value: str) -> str:
        try:
            return normalise(value)
        except ValueError:
            raise ValueError("must be a BCP 47 locale babel knows, such as en or pt-BR") from None

    @field_validator("quiet_hours")
    @classmethod
    def _quiet_hours(cls, value: str) -> str:
        from bot.delivery.holding import InvalidQuietHours, parse_quiet_hours

        try:
            quiet = parse_quiet_hours(value)
        except InvalidQuietHours as exc:
            raise ValueError(str(exc)) from None
        return str(quiet) if quiet else ""

    @field_validator("default_timezone")
    @classmethod
    def _default_timezone(cls, value: str) -> str:
        import zoneinfo

        if value not in zoneinfo.available_timezones():
            raise ValueError("must be an IANA timezone, e.g. Europe/Berlin or UTC")
        return value

    @field_validator("twilio_content_sids", mode="before")
    @classmethod
    def _content_sids(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError:
                raise ValueError('must be a JSON object like {"order_update": "HX..."} or '
                                 '{"order_update": {"en": "HX...", "pt-BR": "HX..."}}') from None
        if isinstance(value, dict):
            return {name: _sid_or_locales(name, entry) for name, entry in value.items()}
        return value


def _is_content_sid(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("HX") and len(value) == 34


def _sid_or_locales(name: str, entry: Any) -> str | dict[str, str]:
    """One TWILIO_CONTENT_SIDS entry checked: a ContentSid, or locale -> ContentSid with each
    locale normalised as a user's is (bot/locales.py), so `pt_br` and `pt-BR` are one key."""
    if _is_content_sid(entry):
        return entry
    if not isinstance(entry, dict) or not entry:
        raise ValueError(f"template {name!r}: a ContentSid is 'HX' followed by 32 hex characters, "
                         'or an object of locale -> ContentSid such as {"en": "HX...", "pt-BR": "HX..."}')
    by_locale: dict[str, str] = {}
    for locale, sid in entry.items():
        try:
            key = normalise(locale)
        except ValueError:
            raise ValueError(f"template {name!r}: a locale must be BCP 47, such as en or pt-BR") from None
        if not _is_content_sid(sid):
            raise ValueError(f"template {name!r}, locale {key}: a ContentSid is 'HX' followed by 32 hex characters")
        if key in by_locale:
            raise ValueError(f"template {name!r} names locale {key} twice")
        by_locale[key] = sid
    return by_locale


def load_settings(overrides: dict[str, Any] | None = None, env_file: str | None = ".env") -> Settings:
    """Read settings from the environment (and `env_file`), with `overrides` taking precedence.

    Raises ConfigError naming each bad variable; the offending values are never included.
    """
    fields = Settings.model_fields
    init = {k.lower(): v for k, v in (overrides or {}).items() if k.lower() in fields}
    try:
        return Settings(_env_file=env_file, **init)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(problems)) from None


def missing_secrets(settings: Settings) -> list[str]:
    """The names of required variables that are unset or empty."""
    missing = []
    for name in REQUIRED_SECRETS:
        value = getattr(settings, name.lower())
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not value:
            missing.append(name)
    if settings.events_webhook_url and settings.events_webhook_secret is None:
        missing.append("EVENTS_WEBHOOK_SECRET")  # unsigned events would be forgeable
    if settings.sendgrid_api_key is not None:
        for name in ("EMAIL_FROM", "SECRET_KEY"):  # no sender; unsubscribe links nobody can verify
            if not getattr(settings, name.lower()):
                missing.append(name)
    return missing


def database_uri(url: str | None, instance_path: str) -> str:
    """SQLAlchemy URI for DATABASE_URL, or a SQLite file under instance/ when it is unset.

    Heroku-style hosts hand out `postgres://`, which SQLAlchemy 2 no longer accepts; we also pin
    the psycopg 3 driver, the one this project installs.
    """
    if not url:
        return "sqlite:///" + str(Path(instance_path) / "bot.db")
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def queue_file(instance_path: str) -> str:
    """The SQLite file that holds the Huey queue when REDIS_URL is unset."""
    return os.path.join(instance_path, "queue.db")
