"""`flask operator create|password|dev-link`, and development mode's one-time sign-in link."""
from __future__ import annotations

import sqlalchemy as sa
from limits import parse
from werkzeug.security import check_password_hash

from bot import create_app
from bot.extensions import db
from bot.dashboard.sign_in_limit import PER_ACCOUNT
from bot.models import Operator, OperatorSession
from tests.conftest import in_process_queue_options
from tests.dashboard.client import Dashboard


def test_create_stores_a_hash_and_refuses_bad_input(app):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["operator", "create", "Ops@Example.com", "--password", "a long enough secret"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        operator = db.session.scalar(sa.select(Operator))
        assert operator.email == "ops@example.com"
        assert "a long enough secret" not in operator.password_hash
        assert check_password_hash(operator.password_hash, "a long enough secret")
    for args, says in ((["ops@example.com", "--password", "another long secret"], "already exists"),
                       (["someone@example.com", "--password", "short"], "12 to 1024"),
                       (["not-an-address", "--password", "a long enough secret"], "not an email address")):
        result = runner.invoke(args=["operator", "create", *args])
        assert result.exit_code != 0 and says in result.output, result.output


def test_the_password_is_prompted_when_not_given(app):
    result = app.test_cli_runner().invoke(args=["operator", "create", "ops@example.com"],
                                          input="prompted secret 123\nprompted secret 123\n")
    assert result.exit_code == 0, result.output
    assert "prompted secret 123" not in result.output


def test_a_new_password_ends_every_session_and_lifts_the_lockout(app, signed_in):
    for _ in range(parse(PER_ACCOUNT).amount):
        Dashboard(app.test_client()).sign_in(password="a wrong guess")
    assert Dashboard(app.test_client()).sign_in().status_code == 429
    result = app.test_cli_runner().invoke(args=["operator", "password", "ops@example.com", "--password",
                                                "a brand new secret"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(OperatorSession)) == 0
    assert signed_in.get("/dashboard/").status_code == 302
    assert Dashboard(app.test_client()).sign_in(password="a brand new secret").status_code == 302


def test_dev_link_is_refused_outside_development_mode(app):
    result = app.test_cli_runner().invoke(args=["operator", "dev-link"])
    assert result.exit_code != 0 and "development mode only" in result.output


def test_a_dev_link_signs_in_once_and_leads_to_the_page_asked_for(base_config, _schema):
    app = create_app({**base_config, "TESTING": True, "DEV_MODE": True,
                      "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    try:
        result = app.test_cli_runner().invoke(args=["operator", "dev-link"])
        assert result.exit_code == 0, result.output
        link = result.output.strip()
        assert "/dashboard/sign-in/link/" in link
        path = "/dashboard/sign-in/link/" + link.rsplit("/", 1)[1]
        browser = Dashboard(app.test_client())
        response = browser.client.get(path + "?next=/dashboard/failures")
        assert response.status_code == 302 and response.headers["Location"] == "/dashboard/failures"
        assert "Sign out developer@example.com" in browser.client.get("/dashboard/").get_data(as_text=True)
        again = Dashboard(app.test_client()).client.get(path)
        assert again.status_code == 410 and "used already" in again.get_data(as_text=True)
        # A second dev-link reuses the account and prints a fresh link.
        assert app.test_cli_runner().invoke(args=["operator", "dev-link"]).output.strip() != link
        with app.app_context():
            assert db.session.scalar(sa.select(sa.func.count()).select_from(Operator)) == 1
            db.session.execute(sa.delete(OperatorSession))
            db.session.execute(sa.delete(Operator))
            db.session.commit()
    finally:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


def test_a_dev_link_is_not_found_outside_development_mode(app, client):
    response = client.get("/dashboard/sign-in/link/anything", base_url="https://bot.example.test")
    assert response.status_code == 404


def test_the_unknown_address_hash_costs_what_a_new_password_costs():
    """A wrong address is checked against `DUMMY_HASH` so that it takes as long as a wrong password
    (no account listing by timing): the constant must be a hash of Werkzeug's default method and
    cost, as a password set today gets (bench/THROUGHPUT.md, "The web's hot path", fourth pass)."""
    from werkzeug.security import generate_password_hash

    from bot.dashboard.accounts import DUMMY_HASH

    method_and_cost = DUMMY_HASH.split("$", 1)[0]
    assert generate_password_hash("anything at all").split("$", 1)[0] == method_and_cost
    assert check_password_hash(DUMMY_HASH, "no account has this password")


def test_the_web_makes_no_password_hash_at_import():
    """Importing the app's dashboard makes no scrypt hash: one takes 32 MiB while it runs, which was
    every process's peak resident memory at start."""
    import subprocess
    import sys

    code = ("import werkzeug.security as s\n"
            "def refuse(*a, **k): raise SystemExit('a password hash at import')\n"
            "s.generate_password_hash = refuse\n"
            "import bot.dashboard.accounts, bot.dashboard.blueprint\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
