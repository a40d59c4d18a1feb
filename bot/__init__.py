"""The WhatsApp bot server: `create_app` builds the Flask app that both processes use."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from pydantic import SecretStr

from bot.config import ConfigError, Settings, database_uri, load_settings, missing_secrets
from bot.devmode import DEV_SENDER, DEV_WEBHOOK_URL, dev_secrets, is_loopback_url, simulator_url

#: Largest request body accepted; Twilio's webhooks and /notify bodies are a few kilobytes.
MAX_CONTENT_LENGTH = 256 * 1024

MIGRATIONS_DIR = str(Path(__file__).parent / "migrations")

#: The variables that name a Twilio account: any one of them means "talk to Twilio".
TWILIO_IDENTITY = ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER")


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app from the environment (and .env), or from `test_config` in tests.

    Raises ConfigError, naming each missing or malformed variable, when the server cannot run.
    """
    # Tests describe their whole configuration; a developer's .env must not leak into them.
    settings = load_settings(test_config, env_file=None if test_config is not None else ".env")
    instance_path = os.path.abspath(settings.instance_path) if settings.instance_path else None
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    app.json.sort_keys = False  # keep answers in the order the contract documents
    dev_mode = _dev_mode_requested(settings, test_config)
    if dev_mode:
        settings = with_dev_defaults(settings, app.instance_path)
    missing = missing_secrets(settings)
    if missing:
        # With no Twilio variable at all, say what made this a deployment: it may be a surprise.
        signals = production_signals(settings)
        if set(signals) & set(TWILIO_IDENTITY):
            signals = []
        raise ConfigError(
            "Missing required configuration: " + ", ".join(missing)
            + ". Set them in the environment or in .env (see .env.example)."
            + (f" This is not development mode because of {', '.join(signals)}; with no Twilio variable "
               "and only local URLs the server runs against the bundled simulator." if signals else "")
        )

    os.makedirs(app.instance_path, exist_ok=True)
    app.config.from_mapping(
        TWILIO_ACCOUNT_SID=settings.twilio_account_sid,
        TWILIO_AUTH_TOKEN=settings.twilio_auth_token.get_secret_value(),
        TWILIO_WHATSAPP_NUMBER=settings.twilio_whatsapp_number,
        TWILIO_WEBHOOK_URL=settings.twilio_webhook_url,
        TWILIO_API_URL=settings.twilio_api_url,
        TWILIO_TIMEOUT=settings.twilio_timeout,
        TWILIO_CONTENT_SIDS=settings.twilio_content_sids,
        NOTIFY_API_TOKEN=settings.notify_api_token.get_secret_value(),
        BOT_NAME=settings.bot_name,
        OPT_OUT_KEYWORDS=settings.opt_out_keywords,
        OPT_IN_KEYWORDS=settings.opt_in_keywords,
        HELP_KEYWORDS=settings.help_keywords,
        OPT_OUT_BUTTON_PAYLOADS=settings.opt_out_button_payloads,
        REDIS_URL=settings.redis_url,
        QUEUE_NAME=settings.queue_name,
        SQLALCHEMY_DATABASE_URI=database_uri(settings.database_url, app.instance_path),
        SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True},
        MAX_CONTENT_LENGTH=MAX_CONTENT_LENGTH,
        DEV_MODE=dev_mode,
    )
    if test_config is not None:
        app.config.update({k: v for k, v in test_config.items() if k.lower() not in type(settings).model_fields})

    # Behind Heroku's router (or any TLS proxy) the app sees http://; Twilio signed https://.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)  # type: ignore[method-assign]
    _configure_logging(app)

    from bot import cli, database
    from bot.delivery import queue, tasks
    from bot.twilio import client as twilio_client
    from bot.extensions import migrate

    database.init_app(app)
    migrate.init_app(app, database.db, directory=MIGRATIONS_DIR, render_as_batch=True)
    queue.init_app(app)
    tasks.init_app(app)
    twilio_client.init_app(app)
    cli.init_app(app)

    from bot.http import contacts_api, health, notify, webhook

    app.register_blueprint(notify.bp)
    app.register_blueprint(contacts_api.bp)
    app.register_blueprint(webhook.bp)
    app.register_blueprint(health.bp)
    app.register_error_handler(HTTPException, _json_http_error)

    if dev_mode:
        app.logger.warning(
            "\n*** DEVELOPMENT MODE: no Twilio credentials are set, so this server talks to the bundled "
            "Twilio simulator at %s, not to Twilio. Development secrets live in %s. Set "
            "TWILIO_ACCOUNT_SID (and the other TWILIO_* variables) to talk to Twilio. ***",
            settings.twilio_api_url, os.path.join(app.instance_path, "dev-secrets.json"),
        )
    elif not settings.twilio_webhook_url:
        app.logger.warning(
            "TWILIO_WEBHOOK_URL is not set: sends carry no StatusCallback and signatures are checked "
            "against the request URL"
        )
    return app


def _dev_mode_requested(settings: Settings, test_config: dict[str, Any] | None) -> bool:
    """Development mode: nothing says this is a real deployment (see production_signals), and
    never silently in tests (a test asks for it with DEV_MODE=True)."""
    if test_config is not None:
        return bool(test_config.get("DEV_MODE"))
    return not production_signals(settings)


def production_signals(settings: Settings) -> list[str]:
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


def with_dev_defaults(settings: Settings, instance_path: str) -> Settings:
    """Settings for the simulator: development secrets, the sandbox sender, local URLs."""
    secrets = dev_secrets(instance_path)
    updates: dict[str, Any] = {
        "twilio_account_sid": secrets["TWILIO_ACCOUNT_SID"],
        "twilio_auth_token": SecretStr(secrets["TWILIO_AUTH_TOKEN"]),
        "twilio_whatsapp_number": settings.twilio_whatsapp_number or DEV_SENDER,
        "twilio_webhook_url": settings.twilio_webhook_url or DEV_WEBHOOK_URL,
    }
    if "twilio_api_url" not in settings.model_fields_set:
        updates["twilio_api_url"] = simulator_url()
    if not settings.notify_api_token:
        updates["notify_api_token"] = SecretStr(secrets["NOTIFY_API_TOKEN"])
    return settings.model_copy(update=updates)


def _json_http_error(exc: HTTPException):
    """Every HTTP error as JSON with an `error` message (backends parse JSON, not HTML)."""
    response = jsonify(error=exc.description or exc.name)
    response.status_code = exc.code or 500
    for header in ("Allow", "WWW-Authenticate", "Retry-After"):
        if exc.get_response().headers.get(header):
            response.headers[header] = exc.get_response().headers[header]
    return response


def _configure_logging(app: Flask) -> None:
    """Our INFO logs on stderr, once, in every process.

    The handler sits on the "bot" logger, not the root: huey_consumer adds its own root handler
    after importing the app, and a root handler of ours would print every line twice.
    """
    logger = logging.getLogger("bot")
    if not any(getattr(h, "_bot_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._bot_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Under pytest the root logger is the capture; elsewhere it would print our lines a second time.
    logger.propagate = bool(app.config.get("TESTING"))
    # Alembic announces each of its plugins at INFO whenever the app is created; that is noise.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


__all__ = ["ConfigError", "create_app"]
