"""The WhatsApp bot server: `create_app` builds the Flask app that both processes use."""
from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from bot.config import ConfigError, load_settings, missing_secrets
from bot.devmode import TWILIO_IDENTITY, dev_mode_requested, production_signals, with_dev_defaults
from bot.logmask import MaskPhoneNumbers


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app from the environment (and .env), or from `test_config` in tests.

    Raises ConfigError, naming each missing or malformed variable, when the server cannot run.
    """
    # Tests describe their whole configuration; a developer's .env must not leak into them.
    settings = load_settings(test_config, env_file=None if test_config is not None else ".env")
    instance_path = os.path.abspath(settings.instance_path) if settings.instance_path else None
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    app.json.sort_keys = False  # keep answers in the order the contract documents
    dev_mode = dev_mode_requested(settings, test_config)
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
    # The dashboard's session cookie (bot/dashboard) travels only over HTTPS, except on a
    # developer's http://127.0.0.1 (development mode).
    app.config.from_mapping(settings.flask_config(app.instance_path), DEV_MODE=dev_mode,
                            SESSION_COOKIE_SECURE=not dev_mode)
    if test_config is not None:
        app.config.update({k: v for k, v in test_config.items() if k.lower() not in type(settings).model_fields})
    if app.config["BOT_QUEUE_LANE"] == "bulk":
        # The bulk process runs a broadcast's work on its own huey threads: the bulk lane exists
        # to keep that work off a worker's huey threads, which here are for nothing else
        # (bot/delivery/bulk_process.py).
        app.config["BULK_LANE_THREADS"] = 0

    # Behind Heroku's router (or any TLS proxy) the app sees http://; Twilio signed https://.
    # X-Forwarded-Host is not trusted: Heroku's router does not set it, so a client could, and
    # choose the URL whose signature is checked (one signed for another app on the account).
    # X-Forwarded-For: the address the one proxy in front saw (Heroku's router appends it), which
    # the dashboard's sign-in limit counts per address (docs/dashboard.md).
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=0)  # type: ignore[method-assign]
    _configure_logging(app)

    from bot import dashboard, database, http
    from bot.delivery import queue, tasks
    from bot.channels.whatsapp import client as twilio_client
    from bot.metrics import setup as metrics

    database.init_app(app)
    from_cli = os.environ.get("FLASK_RUN_FROM_CLI") == "true"
    if from_cli or app.testing:
        # `flask db upgrade` (the release line) and tests need Alembic; gunicorn and huey_consumer
        # never do, and importing it costs each of their processes 11 MB (bench/THROUGHPUT.md, RSS).
        from flask_migrate import Migrate

        Migrate(app, database.db, directory=database.MIGRATIONS_DIR, render_as_batch=True)
    queue.init_app(app)
    tasks.init_app(app)
    twilio_client.init_app(app)
    if from_cli or app.testing:
        # The CLI (`flask chat`, `flask doctor`) and tests run tasks in this process; the worker
        # loads them once it is a consumer (tasks.load_worker), the web never does.
        from bot import cli

        tasks.load_worker()
        cli.init_app(app)
    http.init_app(app)
    dashboard.init_app(app)
    metrics.init_app(app)

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


def _configure_logging(app: Flask) -> None:
    """Our INFO logs on stderr, once, in every process, phone numbers masked (bot/logmask.py).

    The handler sits on the "bot" logger, not the root: huey_consumer adds its own root handler
    after importing the app, and a root handler of ours would print every line twice.
    """
    logger = logging.getLogger("bot")
    if not any(getattr(h, "_bot_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(MaskPhoneNumbers())
        handler._bot_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Under pytest the root logger is the capture; elsewhere it would print our lines a second time.
    logger.propagate = bool(app.config.get("TESTING"))
    # Alembic announces each of its plugins at INFO whenever the app is created; that is noise.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


__all__ = ["ConfigError", "create_app"]
