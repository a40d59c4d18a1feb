"""The email twins of the outage tests (tests/faults/test_outage_processes.py), against real processes:
the Procfile's release, web and worker lines with PostgreSQL and Redis behind TCP proxies that
the tests cut and restore, and SendGrid played by the simulator's SendGrid side, posting signed
events back to the web's /sendgrid/events.

Each test counts what really happened: /notify and event batches answered, emails SendGrid
accepted (duplicates, by the message id in `custom_args`), rows stored and settled (lost ones).
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import outbox
from bot.devtools.sendgrid_simulator import SendGridSimulator
from bot.devtools.simulator import TwilioSimulator
from bot.extensions import db
from bot.models import EmailEvent
from tests.faults.test_email_faults import (TAKEN, assert_no_addresses_logged, email_rows, email_users,
                                     listen_for_events, notify, sendgrid_stand_in, sent_counts)
from tests.faults.test_outage_processes import OUTAGE_SECONDS, health, proxied_stack, pytestmark  # noqa: F401  (fixture)
from tests.faults.test_processes import wait_until


@pytest.fixture
def sendgrid_host() -> Iterator[TwilioSimulator]:
    with sendgrid_stand_in() as host:
        yield host


@pytest.fixture
def email_settings() -> dict[str, str]:
    """More environment for the stack (a test parametrizes it to change one)."""
    return {}


@pytest.fixture
def stack_settings(sendgrid_host, email_settings) -> dict[str, str]:
    """proxied_stack's extra environment: its email goes to this test's SendGrid stand-in."""
    return {"SENDGRID_API_URL": sendgrid_host.url, **email_settings}


def rows(app, statement):
    with app.app_context():
        db.session.remove()
        return db.session.execute(statement).all()


def redeliver_refused(sendgrid: SendGridSimulator, base: str, timeout: float = 60) -> int:
    """What SendGrid's Event Webhook does with a batch not answered 2xx: post it again (for up to
    24 h; here at once, until it is taken). Returns how many batches were posted again."""
    refused = [post for post in sendgrid.event_posts
               if post["status_code"] is None or not 200 <= post["status_code"] < 300]
    for post in refused:
        wait_until(lambda: _post_ok(sendgrid, post["events"], base), timeout=timeout,
                   what="a refused event batch to be taken on a later try")
    return len(refused)


def _post_ok(sendgrid: SendGridSimulator, events: list[dict], base: str) -> bool:
    try:
        return sendgrid.post_events(events, base + "/sendgrid/events").status_code == 200
    except requests.RequestException:
        return False


#: The grace of an email whose fate is unknown, for the outage test: longer than the outage and the
#: redelivery of SendGrid's refused events (so an email SendGrid took is settled by its events,
#: never resent), short enough that an email the worker had claimed but not yet sent when the
#: database went away (a lease re-taken: unknown, no event will ever come) leaves within the
#: test's wait instead of the default 600 s.
OUTAGE_GRACE_SECONDS = 60


@pytest.mark.timeout(420)
@pytest.mark.parametrize("email_settings", [{"EMAIL_UNSURE_GRACE_SECONDS": str(OUTAGE_GRACE_SECONDS)}])
def test_emails_and_sendgrid_events_survive_a_database_outage(proxied_stack, app, sendgrid_host):
    """PostgreSQL is cut for OUTAGE_SECONDS with emails on the wire: SendGrid took them, the
    worker could not record its 202s, and SendGrid's events about them (and repeats of older
    ones) were refused with a 503 meanwhile. SendGrid retries a refused batch (for 24 h): once the
    database is back those events settle the emails, so none is sent twice, none is lost, and
    every event is applied once.

    EMAIL_UNSURE_GRACE_SECONDS is OUTAGE_GRACE_SECONDS: the grace is what stops the worker resending
    an email whose 202 it never recorded before SendGrid's events about it arrive; an email claimed
    but never sent when the database went away waits it out (a delay, never a loss or a copy)."""
    stack = proxied_stack
    base, database = stack["base"], stack["database"]
    sendgrid = sendgrid_host.sendgrid
    listen_for_events(sendgrid, base)
    users = email_users(base, 35)

    # Before: ten emails sent, their processed + delivered events applied.
    before = [notify(base, users[i], f"before {i}").json()["id"] for i in range(10)]
    wait_until(lambda: {s for s, _ in email_rows(app, before).values()} == {"delivered"}, timeout=60,
               what="the first emails to be delivered")
    earlier_emails = sendgrid.emails

    # On the wire at the cut: SendGrid takes each email at once and answers a second later; its
    # events follow half a second after taking it, so they too meet the outage.
    sendgrid.latency, sendgrid.event_delay = 1.0, 0.5
    in_flight = [notify(base, users[10 + i], f"in flight {i}").json()["id"] for i in range(20)]
    wait_until(lambda: len(sendgrid.attempts) > len(before), timeout=30, what="the next batch to reach SendGrid")
    database.cut()
    cut_at, cut_wall = time.monotonic(), time.time()
    code, body = health(base)
    assert code == 503 and body["database"].startswith("unavailable"), body

    answers: Counter = Counter()
    # SendGrid repeats events routinely, and more come: an open for each of the earlier emails.
    for email in earlier_emails:
        batch = [sendgrid.event(email, "open", useragent="Mozilla/5.0", ip="192.0.2.1"),
                 sendgrid.event(email, "delivered", response="250 OK")]
        answers[_status(sendgrid, batch, base)] += 1
        time.sleep(OUTAGE_SECONDS * 0.5 / len(earlier_emails))
    # The backend notifies during the outage: 503 + Retry-After (never a 500), retried later with its key.
    during: dict[str, requests.Response] = {}
    for i in range(5):
        response = notify(base, users[30 + i], f"during {i}", key=f"during-{i}")
        during[users[30 + i]] = response
        answers[response.status_code] += 1
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) > 0 and "database" in response.json()["error"]
    assert database.is_cut and time.monotonic() - cut_at < OUTAGE_SECONDS + 5
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
    database.restore()
    outage, restored_wall = time.monotonic() - cut_at, time.time()

    # Afterwards: the backend retries its requests; SendGrid retries every refused batch.
    later = []
    for i in range(5):
        key = f"during-{i}"
        accepted = wait_until(lambda: (lambda r: r if r.status_code == 202 else None)(
            notify(base, users[30 + i], f"during {i}", key=key)), timeout=60, what=f"/notify {i} after the cut")
        later.append(accepted.json()["id"])
    refused = [post for post in sendgrid.event_posts if post["status_code"] != 200]
    refused_about_in_flight = {event.get("message_id") for post in refused for event in post["events"]} & set(in_flight)
    # Taken by SendGrid less than its 1 s answer before the cut: their 202 came while the worker
    # could not record it (a database error after the provider's 2xx).
    answered_in_the_outage = [email["custom_args"]["message_id"] for email in sendgrid.emails
                              if email["custom_args"]["message_id"] in in_flight
                              and cut_wall - 1 < email["received_at"] < restored_wall - 1]
    redelivered = redeliver_refused(sendgrid, base)
    ids = before + in_flight + later

    def settled():
        states = email_rows(app, ids)
        return states if all(status in ("delivered", "read") and provider for status, provider in states.values()) \
            else None

    states = wait_until(settled, timeout=OUTAGE_GRACE_SECONDS + 150,
                        what="every email to be sent and its events applied")
    time.sleep(2)  # a duplicate would come right behind
    counts = sent_counts(sendgrid)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    lost = sum(1 for i in ids if counts[i] == 0)
    assert duplicated == 0, {i: n for i, n in counts.items() if n > 1}
    assert lost == 0
    assert set(counts) == set(ids)
    assert {i for i, (s, _) in states.items() if s == "read"} == set(before)  # the outage's opens applied
    # Every distinct event stored once: none lost to the 503s, none applied twice for the retries.
    posted = {event["sg_event_id"] for post in sendgrid.event_posts for event in post["events"]}
    stored = Counter(event_id for (event_id,) in rows(app, sa.select(EmailEvent.sg_event_id)))
    assert set(stored) == posted and set(stored.values()) == {1}
    assert set(answers) <= {200, 202, 503}, answers  # never a 500
    assert answered_in_the_outage and refused_about_in_flight and answers[503] > 0, \
        "the outage met no email on the wire, no event, no request: it tested nothing"
    assert health(base)[0] == 200
    assert all(process.poll() is None for process in stack["processes"].values())
    print(f"\nemail during a database outage of {outage:.0f} s: {len(ids)} emails, each sent once, 0 lost, 0 twice; "
          f"{len(answered_in_the_outage)} taken by SendGrid with their 202 arriving in the outage; {len(refused)} "
          f"event batches refused with a 503 ({len(refused_about_in_flight)} emails' events among them), all "
          f"{redelivered} taken when posted again, {len(stored)} distinct events applied once each; /notify during "
          f"the cut: {sum(r.status_code == 503 for r in during.values())} of {len(during)} answered 503, all sent once "
          f"after a retry with their keys")
    assert_no_addresses_logged(stack["logs"])


def _status(sendgrid: SendGridSimulator, events: list[dict], base: str) -> int | str:
    try:
        return sendgrid.post_events(events, base + "/sendgrid/events").status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def test_emails_accepted_while_redis_is_down_are_sent_exactly_once(proxied_stack, app, sendgrid_host):
    """Redis (the queue) is cut while /notify keeps answering 202 for email users: the outbox
    sweep enqueues what the dead queue never got; every email leaves exactly once."""
    stack = proxied_stack
    base, redis_proxy = stack["base"], stack["redis"]
    sendgrid = sendgrid_host.sendgrid
    listen_for_events(sendgrid, base)
    users = email_users(base, 5)

    accepted: dict[str, str] = {}  # body -> message id
    duplicates = 0
    answers: Counter = Counter()

    def send(i: int, key: str | None = None) -> requests.Response:
        response = notify(base, users[i % len(users)], f"notice {i}", key)
        answers[response.status_code] += 1
        return response

    for i in range(5):
        accepted[f"notice {i}"] = send(i).json()["id"]
    redis_proxy.cut()
    code, body = health(base)
    assert code == 503 and body["queue"].startswith("unavailable") and body["database"] == "ok", body
    for i in range(5, 35):
        key = f"outage-{i}"
        accepted[f"notice {i}"] = send(i, key).json()["id"]
        if i % 5 == 0:  # the backend retries a request whose answer it did not see
            assert send(i, key).json()["id"] == accepted[f"notice {i}"]
            duplicates += 1
        time.sleep(0.3)
    redis_proxy.restore()
    for i in range(35, 40):
        accepted[f"notice {i}"] = send(i).json()["id"]
    assert answers == {202: len(accepted) + duplicates}, answers

    # What the dead queue never got, the outbox sweep enqueues (the worker runs it every minute
    # for rows a minute old; here it runs now, as if that minute had passed).
    with app.app_context():
        swept = outbox.sweep(now=utcnow() + timedelta(minutes=2))
    ids = list(accepted.values())
    wait_until(lambda: set(ids) <= set(sent_counts(sendgrid)), timeout=90,
               what="every accepted email to be sent")
    wait_until(lambda: all(s in TAKEN and p for s, p in email_rows(app, ids).values()), timeout=30,
               what="every send to be recorded")
    time.sleep(2)  # anything sent twice would arrive now
    counts = sent_counts(sendgrid)
    assert all(counts[i] == 1 for i in ids), {i: n for i, n in counts.items() if n != 1}
    assert len(sendgrid.emails) == len(ids)
    bodies = {email["custom_args"]["message_id"]: email["text"] for email in sendgrid.emails}
    assert {bodies[i]: i for i in ids} == accepted
    assert health(base)[0] == 200
    assert all(process.poll() is None for process in stack["processes"].values())
    print(f"\nemail, redis outage: {len(accepted) + duplicates} /notify answered 202 ({len(accepted)} distinct, "
          f"{duplicates} idempotent repeats), the sweep re-enqueued {swept['outbound']}; {len(accepted)} emails "
          f"sent exactly once, 0 twice, 0 lost; web and worker not restarted")
    assert_no_addresses_logged(stack["logs"])


@pytest.mark.parametrize("email_settings", [{"EMAIL_MESSAGES_PER_SECOND": "2"}])
def test_emails_waiting_for_rate_slots_when_redis_is_cut_are_sent_once_it_is_back(proxied_stack, app,
                                                                                   sendgrid_host, email_settings):
    """A backlog of emails waits for slots of a 2-a-second email sender when Redis (the shared
    rate budget, and the queue) is cut for 8 s: the waiting sends wait for Redis, not fail; once
    it is back every email is sent exactly once, in each user's order."""
    stack = proxied_stack
    base, redis_proxy = stack["base"], stack["redis"]
    sendgrid = sendgrid_host.sendgrid
    listen_for_events(sendgrid, base)
    users = email_users(base, 6)

    accepted: dict[str, str] = {}  # body -> message id, in creation order
    for round_ in range(4):
        for i, user in enumerate(users):
            body = f"notice {round_} to {i}"
            response = notify(base, user, body)
            assert response.status_code == 202, response.text
            accepted[body] = response.json()["id"]
    time.sleep(1)
    redis_proxy.cut()
    sent_at_cut = len(sendgrid.emails)
    time.sleep(8)
    redis_proxy.restore()
    # A task the dead queue lost would wait for the sweep's next round; run it now, as if its
    # hold-off had passed.
    with app.app_context():
        outbox.sweep(now=utcnow() + outbox.REENQUEUE_AFTER + timedelta(minutes=1))

    ids = list(accepted.values())

    def settled():
        states = {i: s for i, (s, _) in email_rows(app, ids).items()}
        if "failed" in states.values():
            return states  # fail fast
        return states if all(s not in ("pending", "dispatching", "retrying") for s in states.values()) else None

    states = wait_until(settled, timeout=120, what="every email to be sent")
    time.sleep(2)  # anything sent twice would arrive now
    assert sent_at_cut < len(accepted), "the cut came after the backlog was gone: nothing waited for a slot"
    assert "failed" not in states.values(), {i: s for i, s in states.items() if s == "failed"}
    sent = [email["text"] for email in sendgrid.emails]
    assert Counter(sent) == Counter(list(accepted)), {b: n for b, n in Counter(sent).items() if n != 1}
    for i in range(len(users)):  # each user's notices in the order they were created
        to_this = [b for b in sent if b.endswith(f" to {i}")]
        assert to_this == [f"notice {r} to {i}" for r in range(4)], to_this
    worker_log = (stack["logs"] / "worker.log").read_text()
    assert "rate limit's Redis is unreachable" in worker_log  # the sends met the cut while waiting
    assert health(base)[0] == 200
    assert all(process.poll() is None for process in stack["processes"].values())
    print(f"\nemail, redis cut for 8 s under a 2/s backlog: {len(accepted)} emails, {sent_at_cut} sent before the "
          f"cut, the rest waited for Redis; {len(accepted)} sent exactly once, 0 failed, 0 twice, order kept")
    assert_no_addresses_logged(stack["logs"])
