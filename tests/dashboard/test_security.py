"""The dashboard's security: session fixation, CSRF, the sign-in limit against brute force,
escaped markup, no open redirect, the API token and the dashboard's session each refused by the
other side, the cookie's flags and the Content-Security-Policy, and bad input on every form
answered with a clear message, never a 500."""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from limits import parse

from bot import create_app
from bot.dashboard import accounts
from bot.dashboard.sign_in_limit import PER_ACCOUNT, PER_ADDRESS
from bot.extensions import db
from tests.conftest import API_TOKEN, in_process_queue_options
from tests.dashboard.client import BASE, EMAIL, PASSWORD, Dashboard
from tests.dashboard.scenario import ADA, XSS_BODY, XSS_NAME, make_day

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _signed_in_page(response) -> bool:
    return response.status_code == 200 and "Sign out" in response.get_data(as_text=True)


# ---------------------------------------------------------------- sessions


def test_signing_in_makes_a_new_session_and_a_planted_one_stays_signed_out(app, dash, operator, client):
    dash.get("/dashboard/sign-in")
    planted = dash.cookie()
    assert planted, "the sign-in page sets a cookie (its CSRF token)"
    assert dash.sign_in().status_code == 302
    signed = dash.cookie()
    assert signed != planted
    assert _signed_in_page(dash.get("/dashboard/"))
    # The attacker who planted the first cookie still holds only that one.
    attacker = Dashboard(app.test_client())
    attacker.client.set_cookie("dashboard_session", planted, domain="bot.example.test", path="/dashboard")
    response = attacker.get("/dashboard/")
    assert response.status_code == 302 and "/dashboard/sign-in" in response.headers["Location"]


def test_signing_out_ends_the_session_on_the_server(app, signed_in):
    stolen = signed_in.cookie()
    assert signed_in.post("/dashboard/sign-out").status_code == 302
    thief = Dashboard(app.test_client())
    thief.client.set_cookie("dashboard_session", stolen, domain="bot.example.test", path="/dashboard")
    assert thief.get("/dashboard/").status_code == 302


def test_the_cookie_is_httponly_samesite_lax_secure_and_only_for_the_dashboard(dash, operator):
    dash.get("/dashboard/sign-in")
    response = dash.sign_in()
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" in cookie and "Path=/dashboard" in cookie


def test_in_development_mode_the_cookie_works_over_plain_http(base_config, _schema):
    app = create_app({**base_config, "TESTING": True, "DEV_MODE": True,
                      "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    response = app.test_client().get("/dashboard/sign-in")
    assert "Secure" not in response.headers["Set-Cookie"]
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


# ---------------------------------------------------------------- CSRF


@pytest.mark.parametrize("path", ["/dashboard/sign-in", "/dashboard/sign-out", "/dashboard/events/{event}/replay",
                                  "/dashboard/handoff/{contact}/reply", "/dashboard/handoff/{contact}/end"])
def test_every_form_without_its_csrf_token_is_refused(app, twilio, signed_in, path):
    day = make_day(app, twilio)
    app.config["EVENTS_WEBHOOK_URL"] = "http://127.0.0.1:9/events"
    target = path.format(event=day.failed_event_id, contact=day.handoff_contact_id)
    data = {"email": EMAIL, "password": PASSWORD, "body": "hello"}
    for token in (None, "forged-token"):
        response = signed_in.post(target, {**data, **({"csrf_token": token} if token else {})}, with_token=False)
        assert response.status_code == 400, (target, token, response.status_code)
        assert "CSRF" in response.get_data(as_text=True)
    with app.app_context():  # and nothing happened
        from bot.models import Contact, Event
        assert db.session.get(Contact, day.handoff_contact_id).handoff_until is not None
        assert db.session.scalar(db.select(Event.status).where(Event.id == day.failed_event_id)) == "failed"
    assert _signed_in_page(signed_in.get("/dashboard/"))


def test_a_token_from_another_session_is_refused(app, signed_in, operator):
    other = Dashboard(app.test_client())
    other.get("/dashboard/sign-in")
    response = signed_in.post("/dashboard/sign-out", {"csrf_token": other.token}, with_token=False)
    assert response.status_code == 400


def test_the_api_and_the_webhooks_need_no_csrf_token(client, auth):
    response = client.post("/notify", json={"to": ADA, "template": "order_update", "variables": {"1": "17"}},
                           headers=auth)
    assert response.status_code == 202, response.get_json()


def test_the_csrf_settings_are_flask_wtfs_own_defaults():
    """The dashboard binds Flask-WTF's protection on first use (bot/dashboard/security.py,
    LazyCSRF): the settings it leaves unset get the defaults CSRFProtect.init_app would give them,
    so a Flask-WTF that changes one fails here rather than checking tokens another way."""
    from flask import Flask
    from flask_wtf.csrf import CSRFProtect

    from bot.dashboard.security import LazyCSRF

    ours, theirs = Flask("ours"), Flask("theirs")
    for app in (ours, theirs):  # what bot.dashboard.init_app sets before binding it
        app.config.update(WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=None)
    LazyCSRF().init_app(ours)
    CSRFProtect().init_app(theirs)
    settings = {name: value for name, value in theirs.config.items() if name.startswith("WTF_")}
    assert settings and {name: ours.config.get(name) for name in settings} == settings
    assert {name for name in ours.config if name.startswith("WTF_")} == set(settings)
    assert "csrf_token" in ours.jinja_env.globals


# ---------------------------------------------------------------- brute force


def test_the_limit_per_account_holds_even_for_the_right_password(app, dash, operator):
    for _ in range(parse(PER_ACCOUNT).amount):
        assert dash.sign_in(password="wrong password!!").status_code == 401
    refused = dash.sign_in()  # the right password, too late
    assert refused.status_code == 429 and "Too many" in refused.get_data(as_text=True)
    assert dash.get("/dashboard/").status_code == 302
    # From another address the account is still closed: the limit is the account's.
    assert Dashboard(app.test_client()).sign_in().status_code == 429


def test_the_limit_per_address_holds_across_accounts(app, dash, operator):
    for n in range(parse(PER_ADDRESS).amount):
        assert dash.sign_in(email=f"guess{n}@example.com", password="nope nope nope").status_code == 401
    assert dash.sign_in().status_code == 429
    assert Dashboard(app.test_client()).sign_in().status_code == 302  # the operator elsewhere signs in


def test_a_wrong_address_and_a_wrong_password_get_the_same_answer(dash, operator):
    unknown = dash.sign_in(email="nobody@example.com").get_data(as_text=True)
    wrong = dash.sign_in(password="not the password").get_data(as_text=True)
    assert "Wrong email address or password." in unknown and "Wrong email address or password." in wrong


# ---------------------------------------------------------------- markup


def test_a_message_body_and_a_profile_name_are_escaped(app, twilio, signed_in):
    day = make_day(app, twilio)
    for path in ("/dashboard/", f"/dashboard/messages/{day.xss_id}", f"/dashboard/?phone=%2B15550001111"):
        text = signed_in.get(path).get_data(as_text=True)
        assert XSS_BODY not in text and XSS_NAME not in text, path
        assert "&lt;img src=x onerror=alert(" in text, path
    assert "&lt;script&gt;alert(" in signed_in.get("/dashboard/").get_data(as_text=True)


def test_every_page_carries_a_strict_csp_and_no_inline_script(app, twilio, signed_in):
    day = make_day(app, twilio)
    for path in ("/dashboard/", "/dashboard/failures", "/dashboard/events", "/dashboard/handoff",
                 "/dashboard/conversations", f"/dashboard/messages/{day.failed_id}", "/dashboard/sign-in"):
        response = signed_in.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp and response.headers["X-Frame-Options"] == "DENY"
        text = response.get_data(as_text=True)
        # No script element, and no tag with an event handler or a style attribute.
        assert "<script" not in text and not re.search(r"<[^>]*\s(on[a-z]+|style)=", text), path


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/dashboard", "/\\evil.example",
                                    "\\\\evil.example", "javascript:alert(1)", "http:/evil.example",
                                    "/\t/evil.example", "https:evil.example", "/other-app", "dashboard"])
def test_next_never_leaves_the_dashboard(dash, operator, target):
    response = dash.sign_in(next=target)
    assert response.status_code == 302
    assert response.headers["Location"] == "/dashboard/", target


def test_next_within_the_dashboard_is_followed(dash, operator):
    response = dash.sign_in(next="/dashboard/failures?x=1")
    assert response.headers["Location"] == "/dashboard/failures?x=1"


def test_a_page_asked_for_before_signing_in_is_where_sign_in_leads(dash, operator):
    first = dash.get("/dashboard/events")
    assert first.status_code == 302 and "next=/dashboard/events" in first.headers["Location"]
    assert dash.sign_in(next="/dashboard/events").headers["Location"] == "/dashboard/events"


# ---------------------------------------------------------------- two kinds of credentials


def _dashboard_rules(app):
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("dashboard.") and rule.endpoint not in (
                "dashboard.static", "dashboard.sign_in.form", "dashboard.sign_in.submit", "dashboard.sign_in.link"):
            path = rule.rule
            for argument in rule.arguments:
                path = path.replace(f"<{argument}>", {"contact_id": "1"}.get(argument, "0" * 32))
            yield rule, path


def test_the_api_token_opens_no_dashboard_page(app, twilio, client):
    make_day(app, twilio)
    checked = []
    for rule, path in _dashboard_rules(app):
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(path, method=method, base_url=BASE,
                                   headers={"Authorization": f"Bearer {API_TOKEN}"})
            text = response.get_data(as_text=True)
            assert response.status_code in (302, 400, 401), (method, path, response.status_code)
            if response.status_code == 302:
                assert "/dashboard/sign-in" in response.headers["Location"]
            assert ADA not in text and "Your order" not in text  # no number, no body
            checked.append(f"{method} {rule.rule}")
    assert {"GET /dashboard/", "GET /dashboard/messages/<message_id>", "POST /dashboard/handoff/<contact_id>/reply",
            "GET /dashboard/handoff"} <= set(checked)


def test_a_dashboard_session_opens_no_api_route(app, twilio, signed_in):
    day = make_day(app, twilio)
    for method, path in (("GET", f"/messages/{day.failed_id}"), ("GET", "/events"), ("POST", "/notify")):
        response = signed_in.client.open(path, method=method, base_url=BASE, json={"to": ADA, "body": "x"})
        assert response.status_code == 401, (method, path)


def test_without_secret_key_the_dashboard_says_so(base_config, _schema):
    app = create_app({**base_config, "TESTING": True, "SECRET_KEY": None, "SENDGRID_API_KEY": None,
                      "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config)})
    response = app.test_client().get("/dashboard/sign-in", base_url=BASE)
    assert response.status_code == 503 and "SECRET_KEY" in response.get_data(as_text=True)
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("form, status, says", [
    ({}, 400, "Enter your email"),
    ({"email": "ops@example.com"}, 400, "Enter your email"),
    ({"email": "x" * 300, "password": "p"}, 400, "too long"),
    ({"email": "ops@example.com", "password": "p" * 5000}, 400, "too long"),
    ({"email": "ops@example.com", "password": "\x00\ud7ff"}, 401, "Wrong"),
])
def test_bad_sign_in_forms_get_a_clear_message(dash, operator, form, status, says):
    dash.get("/dashboard/sign-in")
    response = dash.post("/dashboard/sign-in", form)
    assert response.status_code == status and says in response.get_data(as_text=True)


@pytest.mark.parametrize("query, says", [
    ("status=nope", "status: one of"), ("channel=fax", "channel: one of"), ("error_code=63o16", "a number"),
    ("error_code=99999999999999999999", "a number"), ("flow=nope", "flow: one of"), ("phone=12", "phone:"),
    ("phone=%2B1", "phone:"), ("before=garbage", "before:"), ("before=2026-01-01T00:00:00~nothex", "before:"),
    ("user=" + "u" * 200, "at most 128"), ("direction=sideways", "direction: one of"),
])
def test_bad_filters_get_a_clear_message(signed_in, query, says):
    response = signed_in.get(f"/dashboard/?{query}")
    assert response.status_code == 400 and says in response.get_data(as_text=True), query


def test_bad_replies_and_ids_get_a_clear_message(app, twilio, signed_in):
    day = make_day(app, twilio)
    contact = day.handoff_contact_id
    cases = [
        (f"/dashboard/handoff/{contact}/reply", {"body": "   "}, 400, "empty"),
        (f"/dashboard/handoff/{contact}/reply", {"body": "x" * 1601}, 400, "1600"),
        ("/dashboard/handoff/99999/reply", {"body": "hi"}, 404, "no such contact"),
        ("/dashboard/handoff/abc/reply", {"body": "hi"}, 404, "no such contact"),
        ("/dashboard/handoff/99999999999999999999/end", {}, 404, "no such contact"),
        ("/dashboard/events/zzz/replay", {}, 404, "no such event"),
    ]
    for path, form, status, says in cases:
        response = signed_in.post(path, form)
        assert response.status_code == status and says in response.get_data(as_text=True), (path, form)
    for path in ("/dashboard/messages/nope", "/dashboard/messages/" + "0" * 32, "/dashboard/sid/%00"):
        assert signed_in.get(path).status_code == 404, path


def test_a_reply_the_api_would_refuse_is_refused_with_its_reason(app, twilio, signed_in):
    day = make_day(app, twilio)
    from bot.models import Contact
    with app.app_context():
        db.session.execute(db.update(Contact).where(Contact.id == day.handoff_contact_id)
                           .values(last_inbound_at=None))
        db.session.commit()
    response = signed_in.post(f"/dashboard/handoff/{day.handoff_contact_id}/reply", {"body": "hello?"})
    assert response.status_code == 422 and "24 hours" in response.get_data(as_text=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(["status", "channel", "direction", "error_code", "flow", "user",
                                               "phone", "before"]), st.text(max_size=40), max_size=4))
def test_any_filter_is_a_page_or_a_clear_400(signed_in, params):
    response = signed_in.client.get("/dashboard/", query_string=params, base_url=BASE)
    assert response.status_code in (200, 400), (params, response.status_code)
