"""Settings and start-up: missing or malformed variables stop the server with a clear message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot import create_app
from bot.config import REQUIRED_SECRETS, ConfigError, Settings, database_uri, load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "auth-token-do-not-print-4f1c"
API_TOKEN = "api-token-do-not-print-9b2e"
SENDER = "whatsapp:+14155238886"
CONTENT_SID = "HX" + "fedcba9876543210" * 2

SECRETS = {
    "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
    "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
    "TWILIO_WHATSAPP_NUMBER": SENDER,
    "NOTIFY_API_TOKEN": API_TOKEN,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable of the developer's shell (or of the CI run) may leak into these settings."""
    for key in list(os.environ):
        if key.lower() in Settings.model_fields:
            monkeypatch.delenv(key)


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    """A complete, valid configuration for create_app, with everything under tmp_path."""
    return {**SECRETS, "INSTANCE_PATH": str(tmp_path), "TESTING": True}


def start_up_error(config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as excinfo:
        create_app(config)
    return str(excinfo.value)


# --- missing secrets ------------------------------------------------------------------------


def test_required_secrets_are_the_documented_four() -> None:
    assert set(REQUIRED_SECRETS) == set(SECRETS)


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_missing_secret_is_named(config: dict[str, Any], name: str) -> None:
    del config[name]
    message = start_up_error(config)
    assert name in message
    for other in set(SECRETS) - {name}:
        assert other not in message, f"{other} is set but reported missing: {message}"


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_empty_secret_counts_as_missing(config: dict[str, Any], name: str) -> None:
    config[name] = ""
    assert name in start_up_error(config)


def test_all_missing_secrets_are_named_at_once(tmp_path: Path) -> None:
    message = start_up_error({"INSTANCE_PATH": str(tmp_path)})
    for name in SECRETS:
        assert name in message


def test_missing_secret_in_config_is_not_filled_from_a_dotenv_in_cwd(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_app(test_config) ignores .env: a developer's file must not leak into tests."""
    (tmp_path / ".env").write_text(f"NOTIFY_API_TOKEN={API_TOKEN}\n")
    monkeypatch.chdir(tmp_path)
    del config["NOTIFY_API_TOKEN"]
    assert "NOTIFY_API_TOKEN" in start_up_error(config)


def test_complete_configuration_starts(config: dict[str, Any]) -> None:
    app = create_app(config)
    assert app.config["TWILIO_ACCOUNT_SID"] == ACCOUNT_SID
    assert app.config["TWILIO_WHATSAPP_NUMBER"] == SENDER
    assert app.config["NOTIFY_API_TOKEN"] == API_TOKEN


# --- malformed values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bad_value", "secret_part"),
    [
        ("TWILIO_ACCOUNT_SID", "ACsecretvalue", "secretvalue"),
        ("TWILIO_ACCOUNT_SID", "XX" + "secretvalue0123" * 2 + "ab", "secretvalue0123"),
        ("TWILIO_WHATSAPP_NUMBER", "whatsapp:secretvalue", "secretvalue"),
        ("TWILIO_WHATSAPP_NUMBER", "2025550143", "2025550143"),
        ("TWILIO_CONTENT_SIDS", '{"order_update": "HXsecretvalue"}', "secretvalue"),
        ("TWILIO_CONTENT_SIDS", "secretvalue, not json", "secretvalue"),
        ("TWILIO_WEBHOOK_URL", "ftp://user:secretvalue@bot.example.test/twilio/webhook", "secretvalue"),
        ("TWILIO_WEBHOOK_URL", "bot.example.test/secretvalue", "secretvalue"),
    ],
)
def test_malformed_value_is_named_without_echoing_it(
    config: dict[str, Any], name: str, bad_value: str, secret_part: str
) -> None:
    config[name] = bad_value
    message = start_up_error(config)
    assert name in message
    assert secret_part not in message, f"the bad value leaked into the message: {message}"


def test_malformed_value_from_environment_is_named_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "ACsecretvalue")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env_file=None)
    assert "TWILIO_ACCOUNT_SID" in str(excinfo.value)
    assert "secretvalue" not in str(excinfo.value)


def test_every_malformed_variable_is_named(config: dict[str, Any]) -> None:
    config.update(TWILIO_ACCOUNT_SID="ACshort", TWILIO_WEBHOOK_URL="not-a-url")
    message = start_up_error(config)
    assert "TWILIO_ACCOUNT_SID" in message
    assert "TWILIO_WEBHOOK_URL" in message


# --- database_uri ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql://postgres@127.0.0.1:5432/test?sslmode=require",
         "postgresql+psycopg://postgres@127.0.0.1:5432/test?sslmode=require"),
        ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("sqlite:////var/data/bot.db", "sqlite:////var/data/bot.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_database_uri(url: str, expected: str, tmp_path: Path) -> None:
    assert database_uri(url, str(tmp_path)) == expected


@pytest.mark.parametrize("url", [None, ""])
def test_database_uri_defaults_to_sqlite_under_instance(url: str | None, tmp_path: Path) -> None:
    uri = database_uri(url, str(tmp_path))
    assert uri.startswith("sqlite:///")
    path = Path(uri[len("sqlite:///"):])
    assert path.parent == tmp_path
    assert path.suffix == ".db"


def test_app_uses_sqlite_under_instance_path_without_database_url(config: dict[str, Any], tmp_path: Path) -> None:
    app = create_app(config)
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    assert uri.startswith("sqlite:///")
    assert Path(uri[len("sqlite:///"):]).parent == tmp_path


def test_app_rewrites_heroku_database_url(config: dict[str, Any]) -> None:
    app = create_app({**config, "DATABASE_URL": "postgres://u:p@db.example.test/bot"})
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://u:p@db.example.test/bot"


# --- reading the environment and .env -------------------------------------------------------


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("TWILIO_WHATSAPP_NUMBER", "+14155238886")
    monkeypatch.setenv("NOTIFY_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("TWILIO_CONTENT_SIDS", json.dumps({"order_update": CONTENT_SID}))
    monkeypatch.setenv("TWILIO_WEBHOOK_URL", "https://bot.example.test/twilio/webhook")
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@h/db")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")

    settings = load_settings(env_file=None)

    assert settings.twilio_account_sid == ACCOUNT_SID
    assert settings.twilio_auth_token is not None
    assert settings.twilio_auth_token.get_secret_value() == AUTH_TOKEN
    assert settings.notify_api_token is not None
    assert settings.notify_api_token.get_secret_value() == API_TOKEN
    assert settings.twilio_whatsapp_number == "whatsapp:+14155238886"
    assert settings.twilio_content_sids == {"order_update": CONTENT_SID}
    assert settings.twilio_webhook_url == "https://bot.example.test/twilio/webhook"
    assert settings.database_url == "postgres://u:p@h/db"
    assert settings.redis_url == "redis://127.0.0.1:6379/3"


def test_unset_environment_gives_defaults() -> None:
    settings = load_settings(env_file=None)
    assert settings.twilio_account_sid is None
    assert settings.twilio_content_sids == {}
    assert settings.twilio_api_url == "https://api.twilio.com"
    assert settings.database_url is None
    assert settings.redis_url is None


def test_overrides_take_precedence_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_API_TOKEN", "from-environment")
    settings = load_settings({"NOTIFY_API_TOKEN": API_TOKEN}, env_file=None)
    assert settings.notify_api_token is not None
    assert settings.notify_api_token.get_secret_value() == API_TOKEN


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"TWILIO_ACCOUNT_SID={ACCOUNT_SID}\n"
        f"TWILIO_AUTH_TOKEN={AUTH_TOKEN}\n"
        "TWILIO_WHATSAPP_NUMBER=+14155238886\n"
        f"NOTIFY_API_TOKEN={API_TOKEN}\n"
        f"TWILIO_CONTENT_SIDS='{json.dumps({'order_update': CONTENT_SID})}'\n"
    )
    settings = load_settings(env_file=str(env_file))
    assert settings.twilio_account_sid == ACCOUNT_SID
    assert settings.twilio_auth_token is not None
    assert settings.twilio_auth_token.get_secret_value() == AUTH_TOKEN
    assert settings.twilio_whatsapp_number == "whatsapp:+14155238886"
    assert settings.twilio_content_sids == {"order_update": CONTENT_SID}


def test_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "NOTIFY_API_TOKEN=from-dotenv\n"
        "TWILIO_WHATSAPP_NUMBER=+15005550006\n"
        "REDIS_URL=redis://from-dotenv:6379/0\n"
    )
    monkeypatch.setenv("NOTIFY_API_TOKEN", "from-environment")
    monkeypatch.setenv("TWILIO_WHATSAPP_NUMBER", "+14155238886")

    settings = load_settings(env_file=str(env_file))

    assert settings.notify_api_token is not None
    assert settings.notify_api_token.get_secret_value() == "from-environment"
    assert settings.twilio_whatsapp_number == "whatsapp:+14155238886"
    assert settings.redis_url == "redis://from-dotenv:6379/0"  # not in the environment: .env fills it


def test_dotenv_is_ignored_when_env_file_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("NOTIFY_API_TOKEN=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(env_file=None).notify_api_token is None


# --- secrets stay secret --------------------------------------------------------------------


def test_settings_repr_hides_secrets() -> None:
    settings = load_settings({**SECRETS, "DATABASE_URL": "sqlite:///x.db"}, env_file=None)
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}", settings.model_dump_json()):
        assert AUTH_TOKEN not in text
        assert API_TOKEN not in text
    # The settings themselves still hold the real values.
    assert settings.twilio_auth_token is not None
    assert settings.twilio_auth_token.get_secret_value() == AUTH_TOKEN


# --- the wsgi entry point -------------------------------------------------------------------


@pytest.mark.parametrize("given, missing", [
    ({"DYNO": "web.1"}, list(SECRETS)),  # a Heroku dyno never falls into development mode
    ({"TWILIO_ACCOUNT_SID": SECRETS["TWILIO_ACCOUNT_SID"]}, [n for n in SECRETS if n != "TWILIO_ACCOUNT_SID"]),
    ({"TWILIO_AUTH_TOKEN": "x"}, [n for n in SECRETS if n != "TWILIO_AUTH_TOKEN"]),
])
def test_wsgi_without_secrets_fails_naming_them(tmp_path: Path, given: dict, missing: list) -> None:
    """`gunicorn wsgi:app` on a host that forgot its secrets: non-zero exit, names the variables."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "HOME": str(tmp_path),
        **given,
    }
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    # The failure is the configuration error, not an unrelated crash on the way to it.
    last_line = result.stderr.strip().splitlines()[-1]
    assert "ConfigError" in last_line, result.stderr
    for name in missing:
        assert name in last_line, result.stderr
    for name in set(SECRETS) - set(missing):
        assert name not in last_line, result.stderr
    assert "DEVELOPMENT MODE" not in result.stderr
    for noise in ("ModuleNotFoundError", "ImportError", "OperationalError", "ValidationError"):
        assert noise not in result.stderr, result.stderr


def test_wsgi_with_no_twilio_variables_starts_in_loud_development_mode(tmp_path: Path) -> None:
    """No account at all: the simulator is used, development secrets are generated and kept."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "HOME": str(tmp_path),
    }
    code = "import wsgi; c = wsgi.app.config; print(c['TWILIO_API_URL'], c['TWILIO_ACCOUNT_SID'], c['DEV_MODE'])"
    first = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    assert "DEVELOPMENT MODE" in first.stderr and "simulator" in first.stderr
    api_url, account_sid, dev_mode = first.stdout.split()
    assert api_url == "http://127.0.0.1:8081" and account_sid.startswith("AC") and dev_mode == "True"
    secrets_file = tmp_path / "instance" / "dev-secrets.json"
    assert secrets_file.stat().st_mode & 0o077 == 0  # readable by the owner only
    assert json.loads(secrets_file.read_text())["TWILIO_AUTH_TOKEN"] not in first.stderr
    # A restart (or the worker, or the simulator) gets the very same secrets.
    second = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert second.stdout.split()[1] == account_sid


def test_wsgi_with_secrets_in_environment_imports(tmp_path: Path) -> None:
    """The same entry point with its four secrets set builds the app (so the test above is fair)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "HOME": str(tmp_path),
        **SECRETS,
    }
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi; print(wsgi.app.config['TWILIO_WHATSAPP_NUMBER'])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SENDER


def run_wsgi(tmp_path: Path, code: str = "import wsgi", **variables: str) -> subprocess.CompletedProcess:
    """Import the Procfile's entry point in a fresh process with only `variables` configured."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "INSTANCE_PATH": str(tmp_path / "instance"),
           "HOME": str(tmp_path), **variables}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("given", [
    {"TWILIO_WHATSAPP_NUMBER": "whatsapp:+15550001111", "NOTIFY_API_TOKEN": API_TOKEN},
    {"TWILIO_WEBHOOK_URL": "https://bot.example.com/twilio/webhook", "NOTIFY_API_TOKEN": API_TOKEN},
    {"TWILIO_API_URL": "https://api.twilio.com"},
])
def test_a_half_configured_host_never_falls_into_development_mode(tmp_path: Path, given: dict) -> None:
    """Forgetting only the account SID and token in production must fail, not talk to a simulator."""
    result = run_wsgi(tmp_path, **given)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "ConfigError" in last_line and "TWILIO_ACCOUNT_SID" in last_line and "TWILIO_AUTH_TOKEN" in last_line
    assert "DEVELOPMENT MODE" not in result.stderr
    assert not (tmp_path / "instance" / "dev-secrets.json").exists()


def test_development_mode_keeps_a_local_api_url_and_webhook_url(tmp_path: Path) -> None:
    code = "import wsgi; c = wsgi.app.config; print(c['DEV_MODE'], c['TWILIO_API_URL'], c['TWILIO_WEBHOOK_URL'])"
    result = run_wsgi(tmp_path, code, TWILIO_API_URL="http://127.0.0.1:9999",
                      TWILIO_WEBHOOK_URL="http://localhost:5001/twilio/webhook")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "http://127.0.0.1:9999", "http://localhost:5001/twilio/webhook"]


def test_every_setting_is_documented_in_env_example_and_the_configuration_page() -> None:
    env_example = (PROJECT_ROOT / ".env.example").read_text()
    reference = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        variable = name.upper()
        assert variable in env_example, f"{variable} is missing from .env.example"
        assert f"`{variable}`" in reference, f"{variable} is missing from docs/configuration.md's table"


def test_a_remote_database_or_redis_is_never_development_mode(tmp_path: Path) -> None:
    result = run_wsgi(tmp_path, DATABASE_URL="postgres://u:p@db.internal.example:5432/bot",
                      REDIS_URL="redis://cache.internal.example:6379/0")
    assert result.returncode != 0 and "DEVELOPMENT MODE" not in result.stderr
    assert "ConfigError" in result.stderr.strip().splitlines()[-1]
    assert "u:p" not in result.stderr  # the database password is never echoed
    assert "not development mode because of DATABASE_URL, REDIS_URL" in result.stderr


def test_a_copied_env_example_keeps_development_mode() -> None:
    """The first step for going live (docs/deploying.md) is `cp .env.example .env`; untouched, it must not
    turn a laptop into a half-configured production server."""
    from bot.devmode import production_signals

    settings = load_settings(env_file=str(PROJECT_ROOT / ".env.example"))
    assert production_signals(settings) == []


# ------------------------------------------------------------------ languages (bot/locales.py)


def test_content_sids_take_one_sid_per_locale_normalised() -> None:
    sid_en, sid_pt = "HX" + "1" * 32, "HX" + "2" * 32
    settings = load_settings({"TWILIO_CONTENT_SIDS": json.dumps(
        {"order_update": {"en": sid_en, "pt_br": sid_pt}, "login": sid_en}), "DEFAULT_LOCALE": "en_us"}, env_file=None)
    assert settings.twilio_content_sids == {"order_update": {"en": sid_en, "pt-BR": sid_pt}, "login": sid_en}
    assert settings.default_locale == "en-US"


@pytest.mark.parametrize("value", [
    {"order_update": {"klingon-xx": "HX" + "1" * 32}},
    {"order_update": {"en": "HXsecretvalue"}},
    {"order_update": {}},
    {"order_update": {"pt-BR": "HX" + "1" * 32, "pt_BR": "HX" + "2" * 32}},
])
def test_a_bad_per_locale_entry_names_the_template_not_the_value(value) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"TWILIO_CONTENT_SIDS": json.dumps(value)}, env_file=None)
    assert "TWILIO_CONTENT_SIDS" in str(refused.value) and "'order_update'" in str(refused.value)
    assert "secretvalue" not in str(refused.value)


def test_default_locale_must_be_a_locale() -> None:
    with pytest.raises(ConfigError, match="DEFAULT_LOCALE"):
        load_settings({"DEFAULT_LOCALE": "nowhere-land"}, env_file=None)
