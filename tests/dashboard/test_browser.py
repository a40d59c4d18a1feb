"""The dashboard in a real browser (Chromium through Playwright): sign in, find a failed message
by its error code, open its timeline, replay its event, answer a contact in handoff and see the
reply reach the simulator, and the refusals without a session and without the CSRF token.

Without a Chromium these tests are skipped, saying why, except under CI (CI set), where a
skip would hide them: there they fail, and .ci/run installs Chromium first."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bot import create_app
from bot.delivery.queue import huey
from bot.extensions import db
from bot.dashboard import accounts
from tests.conftest import empty_tables, in_process_queue_options, run_queue
from tests.dashboard.browser import chromium, chromium_path, serving
from tests.dashboard.client import EMAIL, PASSWORD
from tests.dashboard.scenario import GRACE, make_day
from tests.delivery.test_events import SECRET, Receiver

CHROMIUM = chromium_path()
if CHROMIUM is None:
    reason = ("no Chromium at /usr/bin/chromium (apt-get install -y chromium, or set CHROMIUM_PATH): "
              "the dashboard's browser tests cannot run")
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the browser tests, but {reason}; .ci/run installs it")
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium(CHROMIUM) as running:
        yield running


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def live(base_config, _schema, twilio, receiver) -> Iterator[tuple[object, str]]:
    """The app served over plain HTTP on 127.0.0.1 (so its cookie is not Secure-only), with an
    events receiver and one operator; yields (app, base URL)."""
    app = create_app({**base_config, "TESTING": True, "HUEY_STORAGE_OPTIONS": in_process_queue_options(base_config),
                      "EVENTS_WEBHOOK_URL": receiver.url, "EVENTS_WEBHOOK_SECRET": SECRET,
                      "SESSION_COOKIE_SECURE": False})
    with app.app_context():
        empty_tables()
        accounts.create_operator(EMAIL, PASSWORD)
        db.session.commit()
    huey.flush()
    twilio.reset()
    with serving(app) as url:
        yield app, url
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    huey.flush()


@pytest.fixture
def page(browser, live):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.csp_violations = []  # type: ignore[attr-defined]
    page.on("console", lambda message: "Content Security Policy" in message.text
            and page.csp_violations.append(message.text))
    yield page
    context.close()


def sign_in(page, url: str, then: str = "/dashboard/") -> None:
    page.goto(url + then)
    assert "/dashboard/sign-in" in page.url  # not signed in yet: the form, with where to go next
    page.fill("input[name=email]", EMAIL)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(url + then)


def test_sign_in_find_a_failure_by_its_code_open_its_timeline_and_replay_its_event(live, page, twilio, receiver):
    app, url = live
    day = make_day(app, twilio)
    run_queue()
    before = [request for request in receiver.delivered() if request["id"] == day.failed_event_id]
    sign_in(page, url)
    page.click("nav >> text=Failures")
    page.click("#failures >> text=63016")
    assert "error_code=63016" in page.url
    rows = page.locator("#log tbody tr")
    assert rows.count() == 1 and "Your order #17 shipped" in rows.first.inner_text()
    rows.first.locator("a").first.click()
    page.wait_for_url(f"**/dashboard/messages/{day.failed_id}")
    timeline = page.inner_text("#timeline")
    assert "Twilio callback: failed" in timeline and "event message.status" in timeline
    assert "Outside the 24-hour window" in page.inner_text("#error")
    page.locator("#timeline li", has_text="delivery failed").locator("button", has_text="Replay").click()
    page.wait_for_url(f"**/dashboard/messages/{day.failed_id}")
    assert "queued for delivery again" in page.inner_text(".flash")
    run_queue()
    replayed = [request for request in receiver.delivered() if request["id"] == day.failed_event_id]
    assert len(replayed) == len(before) + 1 and replayed[-1]["data"]["status"] == "failed"
    assert page.csp_violations == []


def test_answer_a_contact_in_handoff_and_the_reply_reaches_the_simulator(live, page, twilio):
    app, url = live
    make_day(app, twilio)
    sign_in(page, url, "/dashboard/handoff")
    card = page.locator("section.card", has_text="My bill is wrong")
    card.locator("textarea[name=body]").fill("Hello Grace, I fixed your bill.")
    card.locator("button", has_text="Send").click()
    assert "Reply queued" in page.inner_text(".flash")
    run_queue()
    assert [m["to"] for m in twilio.messages if m["body"] == "Hello Grace, I fixed your bill."] == ["whatsapp:" + GRACE]
    page.locator("section.card", has_text="My bill is wrong").locator("button", has_text="Give back to the bot").click()
    assert "Nobody is waiting for a person." in page.inner_text("main")
    assert page.csp_violations == []


def test_refused_without_a_session(live, page, twilio):
    app, url = live
    day = make_day(app, twilio)
    page.goto(url + f"/dashboard/messages/{day.failed_id}")
    assert "/dashboard/sign-in" in page.url and "Your order" not in page.content()
    response = page.request.post(url + f"/dashboard/handoff/{day.handoff_contact_id}/end")
    assert response.status in (400, 401)
    with app.app_context():
        from bot.models import Contact
        assert db.session.get(Contact, day.handoff_contact_id).handoff_until is not None


def test_refused_with_a_missing_csrf_token(live, page, twilio):
    app, url = live
    make_day(app, twilio)
    sign_in(page, url, "/dashboard/handoff")
    card = page.locator("section.card", has_text="My bill is wrong")
    card.locator("textarea[name=body]").fill("This must not be sent.")
    # The form loses its token, as a forged cross-site form would have none.
    card.locator("form", has=page.locator("textarea")).locator("input[name=csrf_token]").evaluate("e => e.remove()")
    card.locator("button", has_text="Send").click()
    assert "CSRF token is missing" in page.inner_text("main")
    run_queue()
    assert not [m for m in twilio.messages if m["body"] == "This must not be sent."]
