"""`python -m bot.doctor`: each problem is found and explained; a good setup passes."""
from __future__ import annotations

import pytest

from bot.doctor import FAIL, OK, WARN, main, run_checks
from bot.devtools.simulator import TwilioSimulator
from tests.conftest import ACCOUNT_SID, API_TOKEN, AUTH_TOKEN, SENDER

CONFIG_VARS = ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER", "TWILIO_WEBHOOK_URL",
               "TWILIO_API_URL", "NOTIFY_API_TOKEN", "DATABASE_URL", "REDIS_URL", "INSTANCE_PATH", "DYNO",
               "TWILIO_CONTENT_SIDS")


@pytest.fixture
def environment(monkeypatch, tmp_path, base_config, _schema, twilio):
    """A production-like configuration that passes every check (against the simulator)."""
    for name in CONFIG_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    values = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_WHATSAPP_NUMBER": "+15550009999",
        "TWILIO_WEBHOOK_URL": "https://bot.example.com/twilio/webhook", "TWILIO_API_URL": twilio.url,
        "NOTIFY_API_TOKEN": API_TOKEN + "-long-enough", "DATABASE_URL": base_config["DATABASE_URL"],
        "INSTANCE_PATH": str(tmp_path / "instance"),
    }
    if base_config["REDIS_URL"]:
        values["REDIS_URL"] = base_config["REDIS_URL"]
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def by_status(checks, status):
    return [c.title for c in checks if c.status == status]


def test_a_good_configuration_passes(environment, capsys):
    checks = run_checks(env_file=None)
    assert by_status(checks, FAIL) == []
    assert any("accepts the credentials" in t for t in by_status(checks, OK))
    assert any("migrations up to date" in t for t in by_status(checks, OK))
    assert main() == 0
    assert "No problems found" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER", "NOTIFY_API_TOKEN"])
def test_a_missing_variable_is_named_and_explained(environment, name):
    environment.delenv(name)
    failed = by_status(run_checks(env_file=None), FAIL)
    assert f"{name} is not set" in failed


def test_credentials_refused_by_twilio(environment):
    environment.setenv("TWILIO_AUTH_TOKEN", "a-token-twilio-does-not-know")
    [refused] = [c for c in run_checks(env_file=None) if "refused the credentials" in c.title]
    assert refused.status == FAIL and "20003" in refused.title
    assert "a-token-twilio-does-not-know" not in refused.render()


@pytest.mark.parametrize("url", ["http://bot.example.com/twilio/webhook", "https://127.0.0.1/twilio/webhook"])
def test_webhook_url_must_be_public_https_in_production(environment, url):
    environment.setenv("TWILIO_WEBHOOK_URL", url)
    assert any("not a public https URL" in t for t in by_status(run_checks(env_file=None), FAIL))


def test_unreachable_database_and_redis_are_reported_without_passwords(environment):
    environment.setenv("DATABASE_URL", "postgresql://user:s3cret@127.0.0.1:1/x")
    environment.setenv("REDIS_URL", "redis://:s3cret@127.0.0.1:1/0")
    checks = run_checks(env_file=None)
    failed = by_status(checks, FAIL)
    assert any(t.startswith("database is unreachable") for t in failed)
    assert any(t.startswith("Redis queue is unreachable") for t in failed)
    assert all("s3cret" not in c.render() for c in checks)


def test_unmigrated_database_says_to_run_the_release_step(environment, tmp_path):
    environment.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/empty.db")
    [schema] = [c for c in run_checks(env_file=None) if "schema" in c.title]
    assert schema.status == FAIL and "db upgrade" in schema.advice


def test_sandbox_sender_in_production_is_a_warning(environment):
    environment.setenv("TWILIO_WHATSAPP_NUMBER", SENDER)
    assert "TWILIO_WHATSAPP_NUMBER is the Twilio sandbox" in by_status(run_checks(env_file=None), WARN)


def test_development_mode_checks_the_simulator(environment, tmp_path):
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER", "TWILIO_WEBHOOK_URL",
                 "NOTIFY_API_TOKEN"):
        environment.delenv(name)
    from bot.devmode import dev_secrets

    secrets = dev_secrets(str(tmp_path / "instance"))
    with TwilioSimulator(secrets["TWILIO_ACCOUNT_SID"], secrets["TWILIO_AUTH_TOKEN"]) as simulator:
        environment.setenv("TWILIO_API_URL", simulator.url)
        checks = run_checks(env_file=None)
    assert any(t.startswith("development mode") for t in by_status(checks, WARN))
    assert "the simulator accepts the credentials (account status: active)" in by_status(checks, OK)
    assert by_status(checks, FAIL) == []
    checks = run_checks(env_file=None)  # the simulator is gone now
    assert any(t.startswith("cannot reach the simulator") for t in by_status(checks, FAIL))


@pytest.mark.parametrize("dyno, expected", [(None, WARN), ("web.1", FAIL)])
def test_no_database_or_redis_url_in_production(environment, dyno, expected):
    """SQLite under instance/ is fine on one machine, and wrong on dynos (no shared, lasting disk)."""
    environment.delenv("DATABASE_URL")
    environment.delenv("REDIS_URL", raising=False)
    if dyno:
        environment.setenv("DYNO", dyno)
    checks = run_checks(env_file=None)
    titles = by_status(checks, expected)
    assert any(t.startswith("DATABASE_URL is not set") for t in titles), checks
    assert any(t.startswith("REDIS_URL is not set") for t in titles), checks
