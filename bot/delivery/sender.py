"""Sending one outbound message: claim the row, check consent and the window, call Twilio, record.

The claim (`pending` -> `dispatching` with a lease) is a single conditional UPDATE, so however
many copies of the send task run (huey retries, the outbox sweep, a re-delivered task) only one
reaches Twilio. An attempt whose fate is unknown "may have been accepted" (one state, one rule;
docs/ARCHITECTURE.md, invariant 2): a lease that ran out (the worker died), a connection dropped
after the request was written, a read timeout, a 502/504 from a proxy or a 500 from Twilio (see
`AMBIGUOUS_HTTP_STATUSES`), an error from the client we do not recognise. The row keeps
`unsure_since`, and every later attempt first asks Twilio for the recipient's messages since
then; only when none is ours does it send again. Errors that prove the request never left (a
refused connection, a connect timeout, no rate slot, a worker stopping) retry without a lookup.
A SID Twilio gave us is kept in memory while its commit is retried (a database error after the
201), and the lease is renewed while a batch is in flight, so it can be short: a dead worker's
claims are re-taken within a minute or so.

A send holds no database connection while it waits for the rate limit or for Twilio (the session
is closed before, and a new transaction records the answer), so a worker runs many more sends at
once than it has connections (docs/ARCHITECTURE.md, "How many sends at once").
"""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, Callable

import requests
import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import DBAPIError, IntegrityError
from twilio.base.exceptions import TwilioException

from bot.clock import utcnow
from bot.contacts import opt_out_waiting_clause
from bot.delivery import claims, in_flight, outbox
from bot.delivery.claims import UNSENT, claim, claim_along, release_next, wait_for_turn
from bot.delivery.shutdown import is_stopping
from bot.delivery.rate_limit import send_rate_limit
from bot.delivery.statuses import apply_pending_events, raise_status, report_statuses
from bot.extensions import db
from bot.models import Contact, Message, StatusEvent
from bot.channels.whatsapp.client import get_client
from bot.channels.whatsapp.errors import (OPTED_OUT_CODE, OUTSIDE_WINDOW_CODE, attempt_limit, is_retryable, is_too_fast,
                               request_never_left)
from bot.channels.whatsapp.whatsapp import within_window
from bot.vocabulary import Consent, Direction, Kind, MessageStatus, OUTBOUND_STATUSES

log = logging.getLogger(__name__)

#: Twilio HTTP answers that say nothing of whether the message was accepted: a proxy between us
#: and Twilio lost the answer (502) or gave up waiting for it (504), or Twilio's own 500. Its
#: error 20500 ("an error in the server handling logic or a timeout in the API") says a
#: non-idempotent POST such as sending a message may have taken effect: retried blindly, "it is
#: possible for a customer to receive multiple messages" (twilio.com/docs/api/errors/20500). So a
#: 500 is looked up before another attempt, as a 502/504 is. A 503 (20503, "temporarily
#: unavailable, try again with back-off") refused the request: it retries without a lookup.
AMBIGUOUS_HTTP_STATUSES = frozenset({500, 502, 504})
#: Recent messages asked for when looking up a send whose fate is unknown.
LOOKUP_LIMIT = 50
#: Retries of the commit that records Twilio's answers (a database error after the 201): delays
#: 0.25 s doubling to 2 s, about 4 s in all; with a send on the wire (2 x TWILIO_TIMEOUT at
#: most) it fits the worker's shutdown timeout (tests/test_packaging.py checks).
RECORD_RETRIES = 4
#: Attempts made in quick succession by the send task's own retries (huey: 2, 4, 8, 16, 32 s).
FAST_ATTEMPTS = 6
#: Sends attempted per message in all. After the fast ones, the outbox sweep tries again at
#: `next_attempt_at`, backing off to 30 minutes: a Twilio outage of about two hours delays
#: messages, a longer one fails them with the last error code.
MAX_ATTEMPTS = 15
MAX_BACKOFF = timedelta(minutes=30)


class Outcome(StrEnum):
    """What one run of the send task did (its result, for logs and tests)."""

    SENT = "sent"
    NOT_CLAIMED = "not_claimed"
    REFUSED = "refused"
    FAILED = "failed"
    RETRY = "retry"
    WAITING = "waiting"  # an older message to the same contact goes first
    RELEASED = "released"  # the worker is stopping: back on the queue, not attempted


@dataclass(frozen=True)
class Accepted:
    """Twilio took the message: its SID and the status it answered (or we found it had)."""

    sid: str
    status: str


@dataclass(frozen=True)
class Unknown:
    """The attempt may have been accepted: Twilio must be asked before another one."""

    reason: str
    since: datetime
    http_status: int | None = None
    code: int | None = None


class ShuttingDown(Exception):
    """The worker is stopping: this call did not start (it goes back to the queue)."""


class TransientSendError(Exception):
    """Twilio could not take the message now; the task retries with backoff."""


class RateLimitFull(Exception):
    """No slot in the sender's rate budget came free in time (or its Redis stayed unreachable);
    the message is retried later."""


class NotSent(Exception):
    """Something failed before the request to Twilio was made: retried without a lookup."""


def retry_backoff(attempts: int) -> timedelta:
    """How long after a transiently failed attempt number `attempts` the next one is due:
    1, 2, 4, 8, 16 s (under the task's own retry delays), then 32 s doubling to 30 minutes."""
    return min(timedelta(seconds=2 ** min(max(attempts - 1, 0), 16)), MAX_BACKOFF)


def batch_size() -> int:
    """Messages one send task claims and sends at once: its own and others due (SEND_BATCH)."""
    return int(current_app.config["SEND_BATCH"])


def concurrency() -> int:
    """Twilio calls in flight at once in this worker process (SEND_CONCURRENCY)."""
    return int(current_app.config["SEND_CONCURRENCY"])


@functools.cache
def _recipients_statement() -> sa.Select:
    return (sa.select(Contact, opt_out_waiting_clause(Contact.id))
            .where(Contact.id.in_(sa.bindparam("contact_ids", expanding=True))))


def load_recipients(contact_ids: set[int]) -> dict[int, tuple[Contact, bool]]:
    """Each contact and whether an opt-out of theirs waits for the engine, in one statement."""
    rows = db.session.execute(_recipients_statement(), {"contact_ids": sorted(contact_ids)}).all()
    return {contact.id: (contact, bool(stop_waiting)) for contact, stop_waiting in rows}


def refusal_reason(message: Message | sa.Row, contact: Contact, stop_waiting: bool) -> tuple[int, str] | None:
    """Why this message must not reach Twilio now (opt-out, 24-hour window), or None.

    `stop_waiting`: the contact has sent an opt-out the engine has not handled yet (see
    bot.contacts.opt_out_waiting).
    """
    if message.kind != Kind.OPT_OUT_CONFIRMATION:
        if contact.consent == Consent.OPTED_OUT:
            return OPTED_OUT_CODE, "Recipient has opted out; not sent."
        if stop_waiting:
            # Their STOP is stored but not yet handled by the engine: it is an opt-out all the same.
            return OPTED_OUT_CODE, "Recipient has sent an opt-out (not yet processed); not sent."
    if message.content_sid is None and not within_window(contact.last_inbound_at):
        return OUTSIDE_WINDOW_CODE, "Outside the 24-hour window and no template; not sent."
    return None


def twilio_params(message: Message | sa.Row, contact: Contact) -> dict:
    """The keyword arguments of client.messages.create() for this message."""
    cfg = current_app.config
    params: dict = {"to": contact.whatsapp_address, "from_": cfg["TWILIO_WHATSAPP_NUMBER"]}
    if message.content_sid:
        params["content_sid"] = message.content_sid
        if message.variables:
            params["content_variables"] = json.dumps(message.variables)
    else:
        if message.body:
            params["body"] = message.body
        if message.media_urls:
            params["media_url"] = list(message.media_urls)
    if cfg.get("TWILIO_WEBHOOK_URL"):
        params["status_callback"] = cfg["TWILIO_WEBHOOK_URL"]
    return params


def finish(message_id: str, status: MessageStatus, code: int | None, text: str | None,
           contact_id: int | None = None) -> None:
    """Record a final outcome of ours (refused or failed) and release the claim; commits.

    Our outcome replaces what an earlier transient attempt noted: it is the reason now.
    """
    db.session.execute(sa.update(Message).where(Message.id == message_id)
                       .values(error_code=None, error_message=None)
                       .execution_options(synchronize_session=False))
    raise_status(message_id, status, code, text)
    db.session.commit()
    release_next(message_id, contact_id)


@functools.cache
def _status_statement() -> sa.Select:
    return sa.select(Message.status).where(Message.id == sa.bindparam("message_id"))


def deliver(message_id: str, *, can_retry: bool = False, is_retry: bool = False) -> Outcome:
    """Send one message if it can be claimed, and with it up to SEND_BATCH - 1 other due ones.

    The others (each the next of its own contact, replies first) are claimed in one statement
    and all of them go to Twilio at once through the worker's pool (bot.delivery.in_flight); their
    own tasks, when they run, find them sent. A transient failure leaves a message `retrying`
    with a due time; for this task's own message, with `can_retry` (the task has retries left)
    and few attempts so far, it also raises TransientSendError so huey retries within seconds
    (the others are scheduled for their due time). `is_retry`: this is that retry.
    """
    if db.session.scalar(_status_statement(), {"message_id": message_id}) not in UNSENT:
        # Sent already, most often by a batch that took it along before this task ran: one read,
        # no claim, no lock (the claim below still decides any race). Debug: at a batch's rate
        # this line would outnumber the sends.
        log.debug("message %s already sent or in flight; skipping", message_id)
        return Outcome.NOT_CLAIMED
    if is_stopping():
        # Told to stop between dequeuing this task and running it: leave it for the next worker.
        kind = db.session.scalar(sa.select(Message.kind).where(Message.id == message_id))
        outbox.enqueue(outbox.Work.SEND, message_id, outbox.send_priority(kind))
        return Outcome.RELEASED
    message = claim(message_id, early=is_retry)
    if message is None:
        if wait_for_turn(message_id):
            log.info("message %s waits for an older message to the same contact", message_id)
            return Outcome.WAITING
        message = claim(message_id, early=is_retry)
        if message is None:  # its turn came while it looked
            log.info("message %s not claimable (already sent or in flight); skipping", message_id)
            return Outcome.NOT_CLAIMED
    batch = [message, *claim_along(message_id, batch_size() - 1)]
    outcomes = send_claimed(batch)
    outcome = outcomes[message_id]
    if outcome == Outcome.RETRY and can_retry and message.attempts < FAST_ATTEMPTS:
        raise TransientSendError(f"message {message_id}: attempt {message.attempts} failed; huey retries it")
    for row in batch[1:]:
        if outcomes[row.id] == Outcome.RETRY:
            outbox.enqueue(outbox.Work.SEND, row.id, outbox.send_priority(row.kind), delay=retry_backoff(row.attempts))
    return outcome


#: The batch senders of channels other than WhatsApp (email), registered by the tasks module,
#: the composition root: this module names no other provider.
CHANNEL_SENDERS: dict[str, Callable[[list[sa.Row]], dict[str, "Outcome"]]] = {}


def register_channel(channel: str, send_batch: Callable[[list[sa.Row]], dict[str, "Outcome"]]) -> None:
    """Send the claimed rows of `channel` with `send_batch` (it records their outcomes)."""
    CHANNEL_SENDERS[channel] = send_batch


def send_claimed(batch: list[sa.Row]) -> dict[str, Outcome]:
    """Send claimed messages (at most one per contact) at once; record every outcome. By id.

    Rows of another channel go to its registered sender. For WhatsApp, three rounds, all on the
    pool with the lease renewed while they run: messages whose earlier attempt may have been
    accepted are looked up first (found: recorded, not sent); the rest are sent; any send whose
    fate this attempt left unknown is looked up at once.
    """
    outcomes: dict[str, Outcome] = {}
    for channel, send_batch in CHANNEL_SENDERS.items():
        rows = [row for row in batch if row.channel == channel]
        if rows:
            outcomes.update(send_batch(rows))
    batch = [row for row in batch if row.channel not in CHANNEL_SENDERS]
    if not batch:
        return outcomes
    ready: list[tuple[sa.Row, dict]] = []
    recipients = load_recipients({row.contact_id for row in batch})
    for row in batch:
        if row.attempts > MAX_ATTEMPTS:  # a worker kept dying mid-send: stop, say so
            finish(row.id, MessageStatus.FAILED, None, f"gave up after {MAX_ATTEMPTS} attempts", row.contact_id)
            outcomes[row.id] = Outcome.FAILED
            continue
        contact, stop_waiting = recipients[row.contact_id]
        refusal = refusal_reason(row, contact, stop_waiting)
        if refusal:
            log.info("message %s refused before Twilio: %s", row.id, refusal[1])
            finish(row.id, MessageStatus.FAILED, *refusal, row.contact_id)
            outcomes[row.id] = Outcome.REFUSED
            continue
        ready.append((row, twilio_params(row, contact)))
    if not ready:
        return outcomes
    # Give the connection back while waiting for rate slots and for Twilio: the claims hold the
    # rows, and what was read stays usable, detached (docs/ARCHITECTURE.md).
    db.session.close()
    renew = claims.lease_renewer([row.id for row, _ in ready])
    accepted: list[tuple[sa.Row, Accepted]] = []

    # 1. An earlier attempt may have been accepted: ask Twilio before sending again.
    unsure = [(row, params, row.unsure_since) for row, params in ready if row.unsure_since is not None]
    found = _look_up(unsure, renew, outcomes)
    accepted += [(row, found[row.id]) for row, _, _ in unsure if row.id in found]
    to_send = [(row, params) for row, params in ready if row.id not in found and row.id not in outcomes]

    # 2. Send.
    limit, create = send_rate_limit(), get_client().messages.create

    def send(**params: Any) -> Any:
        # The slot is taken right before the request leaves, in the pool's thread: taken for the
        # whole batch up front, calls queued in the pool would reach Twilio in bursts. A worker
        # told to stop starts no new call (bot/delivery/shutdown.py).
        if is_stopping():
            raise ShuttingDown()
        try:
            acquired = limit.acquire(params["from_"], cancelled=is_stopping)
        except Exception as exc:  # a limiter bug, or an error it does not know: nothing has left
            raise NotSent(f"{type(exc).__name__} from the send rate limit") from exc
        if not acquired:
            raise ShuttingDown() if is_stopping() else RateLimitFull()
        return create(**params)

    calls = in_flight.call_all(send, [params for _, params in to_send], concurrency(),
                               every=renew.every, while_waiting=renew)
    unknown: list[tuple[sa.Row, dict, Unknown]] = []
    for (row, params), call in zip(to_send, calls):
        result = _settle(row, params, call)
        if isinstance(result, Accepted):
            accepted.append((row, result))
        elif isinstance(result, Unknown):
            unknown.append((row, params, result))
        else:
            outcomes[row.id] = result

    # 3. This attempt's fate is unknown: look at once (most often Twilio has it already), unless
    # the worker is stopping: then the row stays unsure and the next worker looks.
    found = {} if is_stopping() else _look_up([(row, params, fate.since) for row, params, fate in unknown],
                                              renew, outcomes)
    for row, params, fate in unknown:
        if row.id in found:
            log.warning("message %s: %s, but Twilio had accepted it as %s", row.id, fate.reason, found[row.id].sid)
            accepted.append((row, found[row.id]))
        elif row.id not in outcomes:
            outcomes[row.id] = _failed_attempt(row, fate.http_status, fate.code, fate.reason, transient=True,
                                               unsure_since=fate.since)
    outcomes.update(_record_accepted_many(accepted))
    return outcomes


def _settle(row: sa.Row, params: dict, call: in_flight.Call) -> Outcome | Accepted | Unknown:
    """What one call's answer means: accepted, unknown (look Twilio up), or the recorded outcome."""
    exc = call.error
    if exc is None:
        log.info("message %s accepted by Twilio as %s", row.id, call.result.sid)
        return Accepted(call.result.sid, (call.result.status or "").lower())
    if isinstance(exc, ShuttingDown):
        return _release(row)
    if isinstance(exc, RateLimitFull):
        return _failed_attempt(row, None, None, "no slot in the sender's rate limit came free in time "
                               "(full, or its Redis unreachable)", transient=True)
    if isinstance(exc, NotSent):
        log.error("message %s: unexpected error before calling Twilio", row.id, exc_info=exc)
        return _failed_attempt(row, None, None, f"not sent: unexpected {exc}", transient=True)
    if isinstance(exc, TwilioException):  # TwilioRestException and (since 9.10) TwilioServiceException
        http_status = getattr(exc, "status", None)
        code = getattr(exc, "code", None)
        text = getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", None) or str(exc)
        if http_status in AMBIGUOUS_HTTP_STATUSES:
            return Unknown(f"HTTP {http_status} from Twilio: {text}", call.started, http_status, code)
        if is_too_fast(http_status, code):
            send_rate_limit().slow_down(params["from_"])
        return _failed_attempt(row, http_status, code, text)
    if isinstance(exc, requests.RequestException):
        if request_never_left(exc):
            return _failed_attempt(row, None, None, f"{type(exc).__name__} connecting to Twilio", transient=True)
        # The request may have reached Twilio and only the answer been lost.
        return Unknown(f"{type(exc).__name__} talking to Twilio", call.started)
    if isinstance(exc, UnicodeEncodeError):
        # The request could not be encoded (a lone surrogate in a field): it never left, and this
        # content never will leave: the one unexpected error certain to recur, so it fails now.
        log.error("message %s: its content cannot be encoded for Twilio", row.id, exc_info=exc)
        db.session.rollback()
        finish(row.id, MessageStatus.FAILED, None, f"not sent: unexpected {type(exc).__name__} (see the worker's log)",
               row.contact_id)
        return Outcome.FAILED
    # Raised by the client itself, which we do not recognise: it may have come after the request
    # was written (an answer it could not read), so the attempt may have been accepted: Twilio is
    # looked up before another. Never `failed` here: nothing unrecognised proves the message can
    # never be sent, and MAX_ATTEMPTS bounds the retries should it be a bug (docs/ARCHITECTURE.md,
    # "Retries").
    log.error("message %s: unexpected error from the Twilio client", row.id, exc_info=exc)
    return Unknown(f"unexpected {type(exc).__name__} from the Twilio client (see the worker's log)", call.started)


def _release(row: sa.Row) -> Outcome:
    """Give a claimed message that never reached Twilio back to the queue: the worker is stopping.

    `retrying` ranks with `dispatching` (the status never moves back), due now, the attempt not
    counted; its task is enqueued again for the next worker.
    """
    db.session.execute(
        sa.update(Message).where(Message.id == row.id, Message.status == MessageStatus.DISPATCHING)
        .values(status=MessageStatus.RETRYING, claimed_until=None, next_attempt_at=utcnow(),
                attempts=Message.attempts - 1)
        .execution_options(synchronize_session=False))
    outbox.defer_send(row.id, row.kind)
    db.session.commit()
    return Outcome.RELEASED


def recent_sends(client: Any, params: dict) -> list[Any]:
    """Twilio's most recent messages from our sender to this recipient (no database, no app
    context: safe on the pool's threads)."""
    return list(client.messages.list(to=params["to"], from_=params["from_"], limit=LOOKUP_LIMIT))


def _look_up(rows: list[tuple[sa.Row, dict, datetime]], renew: claims.LeaseRenewer,
             outcomes: dict[str, Outcome]) -> dict[str, Accepted]:
    """For each (row, params, since): Twilio's message that is this send, if Twilio has one.

    The lists are fetched on the pool; a lookup that fails leaves its row `retrying` (still
    unsure) in `outcomes`, and it is never sent blind.
    """
    if not rows:
        return {}
    client = get_client()
    calls = in_flight.call_all(recent_sends, [{"client": client, "params": params} for _, params, _ in rows],
                               concurrency(),
                               every=renew.every, while_waiting=renew)
    found: dict[str, Accepted] = {}
    taken: set[str] = set()
    for (row, params, since), call in zip(rows, calls):
        if call.error is not None:
            log.warning("message %s: could not ask Twilio whether an earlier attempt was accepted (%s); "
                        "it will ask again before sending", row.id, type(call.error).__name__)
            outcomes[row.id] = _failed_attempt(row, None, None, "could not look Twilio up before resending",
                                               transient=True, unsure_since=since)
            continue
        match = match_accepted_send(row, params, call.result, since, exclude=taken)
        if match is not None:
            taken.add(match.sid)
            found[row.id] = match
    return found


def match_accepted_send(message: Message | sa.Row, params: dict, recent: list[Any], since: datetime,
                        exclude: set[str] = frozenset()) -> Accepted | None:
    """Which of Twilio's `recent` messages is this send, if any.

    Candidates: messages from our sender to this recipient created since the attempt began (with
    a minute of slack for clock skew), whose SID no row of ours holds, with the same body when
    the send had one. A template's text is Twilio's to render, so for a template (or media
    alone) the lookup only answers when no other message to this contact is in flight (it could
    be that one's); then the send is retried: a possible duplicate rather than a lost message.
    """
    sent_body = params.get("body")
    if not sent_body:
        in_flight_beside = db.session.scalar(
            sa.select(sa.func.count()).select_from(Message).where(
                Message.contact_id == message.contact_id, Message.direction == Direction.OUTBOUND,
                Message.id != message.id, Message.status == MessageStatus.DISPATCHING))
        if in_flight_beside:
            return None
    earliest = since - timedelta(minutes=1)
    candidates = []
    for candidate in recent:
        created = candidate.date_created
        if created is None or created.astimezone(timezone.utc).replace(tzinfo=None) < earliest:
            continue
        if sent_body and (candidate.body or "") != sent_body:
            continue
        if candidate.sid not in exclude:
            candidates.append(candidate)
    if not candidates:
        return None
    held = set(db.session.scalars(sa.select(Message.twilio_sid).where(
        Message.twilio_sid.in_([c.sid for c in candidates]))))
    db.session.commit()
    for candidate in reversed(candidates):  # Twilio lists newest first: take the earliest of ours
        if candidate.sid not in held:
            return Accepted(candidate.sid, (candidate.status or MessageStatus.QUEUED.value).lower())
    return None


@functools.cache
def _accepted_statement() -> sa.Update:
    rank = sa.bindparam("rank")
    moves = Message.status_rank < rank  # as raise_status does, in the same statement
    return (sa.update(Message).where(Message.id == sa.bindparam("message_id"))
            .values(sent_at=sa.bindparam("now"), updated_at=sa.bindparam("now"), next_attempt_at=None,
                    claimed_until=None, unsure_since=None, twilio_sid=sa.bindparam("sid"), error_code=None,
                    error_message=sa.bindparam("error_message"),
                    status=sa.case((moves, sa.bindparam("status")), else_=Message.status),
                    status_rank=sa.case((moves, rank), else_=Message.status_rank))
            .execution_options(synchronize_session=False))


def _accepted_status(twilio_status: str) -> MessageStatus:
    # Twilio answers a create() with its starting status (queued, accepted, scheduled); a lookup
    # may find a later one (sent, delivered...).
    return MessageStatus(twilio_status) if twilio_status in OUTBOUND_STATUSES else MessageStatus.QUEUED


@functools.cache
def _early_events_statement() -> sa.Select:
    return (sa.select(StatusEvent.twilio_sid)
            .where(StatusEvent.twilio_sid.in_(sa.bindparam("sids", expanding=True))).distinct())


@functools.cache
def _waiting_contacts_statement() -> sa.Select:
    return (sa.select(Message.contact_id)
            .where(Message.contact_id.in_(sa.bindparam("contact_ids", expanding=True)),
                   Message.direction == Direction.OUTBOUND, Message.status == MessageStatus.PENDING,
                   Message.id.not_in(sa.bindparam("ids", expanding=True))).distinct())


def _record_accepted_many(accepted: list[tuple[sa.Row, Accepted]]) -> dict[str, Outcome]:
    """Record what Twilio accepted; the SIDs stay in memory while the commit is retried.

    A database error right after Twilio's 201 (a failover, a dropped connection, SQLite's
    "database is locked") must not turn into a second message: the commit is retried with
    backoff (RECORD_RETRIES). Should the database stay away longer, the rows keep their claims;
    when the lease runs out, whoever re-takes them looks Twilio up and finds these SIDs.
    """
    if not accepted:
        return {}
    for attempt in range(RECORD_RETRIES + 1):
        try:
            return _record_accepted_rows(accepted)
        except DBAPIError as exc:
            if isinstance(exc, IntegrityError):
                raise  # not the database's health: _record_accepted_rows handles a SID seen twice
            db.session.rollback()
            if attempt == RECORD_RETRIES:
                log.error("could not record %d messages Twilio accepted (%s); their lease will run out and "
                          "the next attempt finds them at Twilio", len(accepted),
                          ", ".join(f"{row.id}={result.sid}" for row, result in accepted))
                return {row.id: Outcome.RETRY for row, _ in accepted}
            delay = 0.25 * 2 ** attempt
            log.warning("database error recording %d accepted sends; retrying in %.2f s", len(accepted), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _record_accepted_rows(accepted: list[tuple[sa.Row, Accepted]]) -> dict[str, Outcome]:
    """Record the SIDs of a batch in one round trip, then its early callbacks and who is next."""
    if len(accepted) == 1:
        row, result = accepted[0]
        return {row.id: _record_accepted(row.id, row.contact_id, result.sid, result.status)}
    now = utcnow()
    try:
        # Commit the SIDs first, then look for callbacks that beat us here (see
        # statuses.record_callback). One executemany: a single round trip on psycopg 3.
        db.session.connection().execute(_accepted_statement(), [
            {"message_id": row.id, "now": now, "sid": result.sid, "error_message": None,
             "status": _accepted_status(result.status).value, "rank": _accepted_status(result.status).rank}
            for row, result in accepted])
        # Each row was `dispatching` (callbacks wait for its SID), so each moved: the backend
        # hears of it in the same commit (invariant 12).
        report_statuses({row.id: _accepted_status(result.status) for row, result in accepted})
        db.session.commit()
    except IntegrityError:  # a SID already on another row (a mistaken lookup): one by one
        db.session.rollback()
        return {row.id: _record_accepted(row.id, row.contact_id, result.sid, result.status)
                for row, result in accepted}
    by_sid = {result.sid: row.id for row, result in accepted}
    for sid in db.session.scalars(_early_events_statement(), {"sids": sorted(by_sid)}).all():
        apply_pending_events(sid, by_sid[sid])
    contacts = {row.contact_id: row.id for row, _ in accepted}
    waiting = db.session.scalars(_waiting_contacts_statement(), {
        "contact_ids": sorted(contacts), "ids": [row.id for row, _ in accepted]}).all()
    db.session.commit()
    for contact_id in waiting:  # most contacts have nobody behind them (release_next's lock is rare)
        release_next(contacts[contact_id], contact_id)
    return {row.id: Outcome.SENT for row, _ in accepted}


def _record_accepted(message_id: str, contact_id: int, sid: str, twilio_status: str) -> Outcome:
    status = _accepted_status(twilio_status)

    def record(sid: str | None, error_message: str | None = None) -> None:
        db.session.execute(_accepted_statement(), {
            "message_id": message_id, "now": utcnow(), "sid": sid, "error_message": error_message,
            "status": status.value, "rank": status.rank})
        # The row was `dispatching` (callbacks wait for its SID), so it moved (invariant 12).
        report_statuses({message_id: status})
        db.session.commit()

    try:
        # Commit the SID first, then look for callbacks that beat us here (see
        # status.record_callback). Accepted: what an earlier transient attempt noted is history
        # (it is in the worker's log).
        record(sid)
    except IntegrityError:
        # Another row already holds this SID (it can only come from a mistaken lookup). Twilio
        # did accept a message for this row, so record it as sent rather than resend.
        db.session.rollback()
        log.error("message %s: Twilio SID %s is already recorded on another message", message_id, sid)
        record(None, f"Twilio SID {sid} is recorded on another message")
        release_next(message_id, contact_id)
        return Outcome.SENT
    apply_pending_events(sid, message_id)
    release_next(message_id, contact_id)
    return Outcome.SENT


def _failed_attempt(message: Message | sa.Row, http_status: int | None, code: int | None, text: str,
                    transient: bool | None = None, unsure_since: datetime | None = None) -> Outcome:
    """Record a failed attempt: `retrying` with a backoff, or `failed` once retries are spent.

    `unsure_since`: the attempt may have been accepted (its fate is unknown); the row keeps the
    earliest such time, and its next attempt looks Twilio up before sending.
    """
    message_id, attempts = message.id, message.attempts
    retry = is_retryable(http_status, code) if transient is None else transient
    if retry and attempts < attempt_limit(code, MAX_ATTEMPTS):
        # `retrying` ranks with `dispatching`, so the status never moves back; the claim is
        # released and the next attempt is due after a backoff (the sweep's safety net). The
        # error says why, so a backend polling the message sees the reason while it waits.
        now = utcnow()
        values: dict[str, Any] = dict(
            status=MessageStatus.RETRYING, claimed_until=None, updated_at=now,
            next_attempt_at=now + retry_backoff(attempts), error_code=code,
            error_message=f"attempt {attempts} failed, retrying: {text}"[:1000])
        if unsure_since is not None:
            values["unsure_since"] = sa.func.coalesce(Message.unsure_since, unsure_since)
        db.session.execute(
            sa.update(Message).where(Message.id == message_id, Message.status == MessageStatus.DISPATCHING)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        db.session.commit()
        log.warning("message %s: transient Twilio failure (HTTP %s, code %s), attempt %d of %d; will retry%s",
                    message_id, http_status, code, attempts, MAX_ATTEMPTS,
                    " after looking Twilio up" if unsure_since is not None else "")
        return Outcome.RETRY
    log.warning("message %s failed (HTTP %s, code %s): %s", message_id, http_status, code, text)
    finish(message_id, MessageStatus.FAILED, code, text, message.contact_id)
    return Outcome.FAILED
