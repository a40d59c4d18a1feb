"""Sending claimed messages: batch them, rate-limit, call each message's channel, record.

This module knows no provider (docs/ARCHITECTURE.md, "The channel seam"). The claims, the
contact's turn and the lease are bot.delivery.claims; everything a provider decides (the request,
its refusals, what an answer means, how to look up a send whose answer was lost) is the
message's channel (bot/channels/base.py), registered by the tasks module. What is left here is
channel-neutral: the batch, the rate limit, the pool, recording outcomes, retries with backoff,
holds, failures, and handing the contact's turn to their next message. A message whose quiet
hours (`messages.quiet_hours`) cover the moment it is about to leave, in its recipient's own
timezone, goes back to the database until they end (docs/ARCHITECTURE.md, invariant 15, "Quiet
hours at send time").

An attempt whose fate is unknown "may have been accepted" (one state, one rule; invariant 2): a
lease that ran out (the worker died), or a channel's `Unknown` (a lost answer). The row keeps
`unsure_since`, and every later attempt first asks its channel to look the send up; only when
the provider does not have it is it sent again. Errors that prove the request never left (a
channel's `Failed(retry)`, no rate slot, a worker stopping) retry without a lookup. A provider id
we were given is kept in memory while its commit is retried (a database error after the
provider's 2xx).

A send holds no database connection while it waits for the rate limit or for the provider (the
session is closed before, and a new transaction records the answer), so a worker runs many more
sends at once than it has connections (docs/ARCHITECTURE.md, "How many sends at once").
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import DBAPIError, IntegrityError

from bot.channels.base import Channel, Refusal, Wait
from bot.channels.outcomes import Accepted, Failed, Unknown
from bot.clock import utcnow
from bot.contacts import opt_out_waiting_clause
from bot.database import close_after_reads
from bot.delivery import bulk_lane, claims, in_flight, outbox, release
from bot.delivery.claims import UNSENT, claim, claim_along, release_next, wait_for_turn
from bot.delivery.holding import quiet_until
from bot.delivery.rate_limit import bulk_headroom, bulk_share_key, bulk_share_rate, send_rate_limit
from bot.delivery.shutdown import is_stopping
from bot.delivery.statuses import apply_pending_events, raise_status, report_statuses
from bot.extensions import db
from bot.metrics import counters as metrics
from bot.models import Contact, Message, StatusEvent
from bot.vocabulary import Direction, Kind, MessageStatus

log = logging.getLogger(__name__)

#: Retries of the commit that records the provider's answers (a database error after its 2xx):
#: delays 0.25 s doubling to 2 s, about 4 s in all; with a send on the wire (2 x TWILIO_TIMEOUT
#: at most) it fits the worker's shutdown timeout (tests/test_packaging.py checks).
RECORD_RETRIES = 4
#: Attempts made in quick succession by the send task's own retries (huey: 2, 4, 8, 16, 32 s).
FAST_ATTEMPTS = 6
#: Sends attempted per message in all (a channel's `Failed.max_attempts` may allow fewer). After
#: the fast ones, the outbox sweep tries again at `next_attempt_at`, backing off to 30 minutes: a
#: provider outage of about two hours delays messages, a longer one fails them with the last
#: error code.
MAX_ATTEMPTS = 15
MAX_BACKOFF = timedelta(minutes=30)
#: Messages one send task of a broadcast claims together: a batch is recorded once its last
#: call is answered, and a broadcast's calls wait for the bulk share's slots, so small batches
#: keep its few messages in flight moving (docs/delivery.md, "Broadcasts").
BROADCAST_SEND_BATCH = 8
#: A held message (the account, not the message, is at fault: SendGrid's 401) is tried this often,
#: never failed for it.
HOLD_DELAY = timedelta(minutes=5)


class Outcome(StrEnum):
    """What one run of the send task did (its result, for logs and tests)."""

    SENT = "sent"
    NOT_CLAIMED = "not_claimed"
    REFUSED = "refused"
    FAILED = "failed"
    RETRY = "retry"
    WAITING = "waiting"  # an older message to the same contact goes first
    RELEASED = "released"  # the worker is stopping: back on the queue, not attempted
    HELD = "held"  # inside its recipient's quiet hours: held in the database until they end


class ShuttingDown(Exception):
    """The worker is stopping: this call did not start (it goes back to the queue)."""


class TransientSendError(Exception):
    """The provider could not take the message now; the task retries with backoff."""


class RateLimitFull(Exception):
    """No slot in the sender's rate budget came free in time (or its Redis stayed unreachable);
    the message is retried later."""


class NotSent(Exception):
    """Something failed before the request to the provider was made: retried without a lookup."""


#: The channels, by `messages.channel`, registered by the tasks module (the composition root).
CHANNELS: dict[str, Channel] = {}


def register_channel(channel: Channel) -> None:
    """Send the messages of `channel.name` through `channel`."""
    CHANNELS[channel.name] = channel


def warm() -> None:
    """Build each channel's client now, as the worker starts, not in its first batch: the Twilio
    client's first build (the SDK's modules, the HTTP pools) costs about 0.15 s of CPU, which the
    first sends after a start waited for, and which a backlog's figure counted as theirs
    (bench/THROUGHPUT.md, "Issue 17: a send's waits"). In an app context; a channel that cannot
    build its client here (not configured) says so in its first batch, as before."""
    for channel in CHANNELS.values():
        try:
            channel.open_sender()
        except Exception as exc:  # noqa: BLE001 - its first batch reports it
            log.debug("the %s channel's client was not built at start (%s)", channel.name, type(exc).__name__)


@dataclass(frozen=True)
class _Send:
    """A claimed message, its channel and the provider request the channel built for it."""

    row: sa.Row
    channel: Channel
    request: Any
    rate_key: str
    #: The channel's sends per second (its own budget: email never spends WhatsApp's).
    rate: int
    #: A broadcast's message: its share of `rate` (BROADCAST_RATE_SHARE), taken before the
    #: sender's own slot (invariant 16); None for every other message.
    bulk_rate: int | None = None


def retry_backoff(attempts: int) -> timedelta:
    """How long after a transiently failed attempt number `attempts` the next one is due:
    1, 2, 4, 8, 16 s (under the task's own retry delays), then 32 s doubling to 30 minutes."""
    return min(timedelta(seconds=2 ** min(max(attempts - 1, 0), 16)), MAX_BACKOFF)


def batch_size() -> int:
    """Messages one send task claims and sends at once: its own and others due (SEND_BATCH)."""
    return int(current_app.config["SEND_BATCH"])


def concurrency() -> int:
    """Provider calls in flight at once in this worker process (SEND_CONCURRENCY)."""
    return int(current_app.config["SEND_CONCURRENCY"])


@functools.cache
def _recipients_statement() -> sa.Select:
    return (sa.select(Contact, opt_out_waiting_clause(Contact.id))
            .where(Contact.id.in_(sa.bindparam("contact_ids", expanding=True))))


def load_recipients(contact_ids: set[int]) -> dict[int, tuple[Contact, bool]]:
    """Each contact and whether an opt-out of theirs waits for the engine, in one statement."""
    rows = db.session.execute(_recipients_statement(), {"contact_ids": sorted(contact_ids)}).all()
    return {contact.id: (contact, bool(stop_waiting)) for contact, stop_waiting in rows}


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
    return (sa.select(Message.status, Message.claimed_until, Message.kind)
            .where(Message.id == sa.bindparam("message_id")))


#: Ids of messages a batch of this process took along, from their claim on: while the batch
#: holds them, and once it settled them for good (accepted, failed, refused), their own send tasks
#: (right behind on the queue) end without a statement. The batch itself puts every message it
#: did not settle back on the queue (a retry, a release), and takes it out of here first; a
#: settled message never becomes sendable again (its status only moves up); a process that dies
#: takes this memory with it and the sweep re-enqueues what its claims held. So the memory is
#: only a shortcut, never needed by another process; it keeps the latest `_OWNED_MAX`.
_OWNED_MAX = 20_000
_owned: dict[str, None] = {}
_owned_lock = threading.Lock()


def _own(message_ids: list[str]) -> None:
    with _owned_lock:
        for message_id in message_ids:
            _owned[message_id] = None
        for _ in range(len(_owned) - _OWNED_MAX):
            del _owned[next(iter(_owned))]


def owns(message_id: str) -> bool:
    """Whether a batch of this process holds or settled this message: its send task would end at
    once without a statement (`deliver`'s first line), so the queue drops it unrun
    (`queue.skip_when`, registered by the tasks module)."""
    return message_id in _owned


def _disown(message_id: str) -> None:
    """Its own task must run again (it goes back on the queue): before it is enqueued."""
    with _owned_lock:
        _owned.pop(message_id, None)


def deliver(message_id: str, *, can_retry: bool = False, is_retry: bool = False, requeue: bool = False) -> Outcome:
    """Send one message if it can be claimed, and with it up to SEND_BATCH - 1 other due ones.

    The others (each the next of its own contact, replies first) are claimed in one statement
    and all of them go to their providers at once through the worker's pool (bot.delivery.in_flight); their
    own tasks, when they run, find them sent. A transient failure leaves a message `retrying`
    with a due time; for this task's own message, with `can_retry` (the task has retries left)
    and few attempts so far, it also raises TransientSendError so huey retries within seconds
    (the others are scheduled for their due time). `is_retry`: this is that retry. `requeue`:
    no task of huey's retries this one (the bulk lane): its own message, left `retrying`, goes
    back on the queue for its due time, as the others do.
    """
    if message_id in _owned:
        # Taken along by a batch of this process, in flight or settled (most tasks, draining a
        # backlog): nothing to read.
        return Outcome.NOT_CLAIMED
    current = db.session.connection().execute(_status_statement(), {"message_id": message_id}).first()
    if current is None or current.status not in UNSENT or (
            current.status == MessageStatus.DISPATCHING and current.claimed_until is not None
            and current.claimed_until > utcnow()):
        # Sent already, or in flight under a live claim, most often in a batch that took it along
        # before this task ran: one read, no claim, no lock (the claim below still decides any
        # race; an expired claim is re-taken below). Debug: at a batch's rate this line would
        # outnumber the sends.
        db.session.rollback()
        log.debug("message %s already sent or in flight; skipping", message_id)
        return Outcome.NOT_CLAIMED
    if is_stopping():
        # Told to stop between dequeuing this task and running it: leave it for the next worker.
        db.session.rollback()
        outbox.enqueue(outbox.Work.SEND, message_id, outbox.send_priority(current.kind))
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
    bulk = message.kind == Kind.BROADCAST
    size = min(batch_size(), BROADCAST_SEND_BATCH) if bulk else batch_size()
    batch = [message, *claim_along(message_id, size - 1, message.channel, of_broadcast=bulk)]
    _own([row.id for row in batch[1:]])
    try:
        outcomes = send_claimed(batch)
    except BaseException:
        # Unsettled: their claims run out and the sweep enqueues them; those tasks must run.
        for row in batch[1:]:
            _disown(row.id)
        raise
    outcome = outcomes[message_id]
    for row in (batch if requeue else batch[1:]):  # first: this task may raise for its own message's fast retry
        if outcomes[row.id] == Outcome.RETRY:
            _disown(row.id)
            outbox.enqueue(outbox.Work.SEND, row.id, outbox.send_priority(row.kind, row.channel),
                           delay=retry_backoff(row.attempts))
    if outcome == Outcome.RETRY and can_retry and not requeue and message.attempts < FAST_ATTEMPTS:
        raise TransientSendError(f"message {message_id}: attempt {message.attempts} failed; huey retries it")
    return outcome


def take_bulk(message_id: str, is_retry: bool = False) -> bool:
    """Send a broadcast's message (and its batch) on this process's bulk lane rather than on the
    huey thread that dequeued its task, which a turn may need: the batch waits there for its
    share's rate slots and for the provider (bot/delivery/bulk_lane.py; invariant 16). False when
    the lane is off (BULK_LANE_THREADS=0), full or the worker is stopping: the caller sends it."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def run() -> None:
        try:
            deliver(message_id, is_retry=is_retry, requeue=True)
        except Exception:
            # Its claims (if any) run out and the outbox sweep enqueues them; unclaimed, the
            # pump's straggler kick does (invariant 1).
            log.exception("message %s: the bulk lane's send failed; it is sent again later", message_id)
            db.session.rollback()

    def give_back() -> None:
        outbox.enqueue(outbox.Work.SEND, message_id, outbox.Priority.BROADCAST)

    return bulk_lane.lane.take(bulk_lane.Work(app, f"send {message_id}", run, give_back),
                               int(app.config["BULK_LANE_THREADS"]))


#: Threads of this process that send the replies turns hand over (outbox.hand_over_sends), each
#: a batch of whatever was handed over meanwhile (up to SEND_BATCH), as a send task's batch.
HAND_OVER_THREADS = 8
#: Replies waiting for a hand-over thread beyond which a reply takes the queue instead.
HAND_OVER_WAITING_MAX = 500


class _HandOver:
    """The replies handed over by this process's turns, waiting for a hand-over thread."""

    def __init__(self) -> None:
        self.ready = threading.Condition()
        self.waiting: list[tuple[Any, str, int]] = []  # (app, message id, queue priority)
        self.threads: list[threading.Thread] = []
        self.sending = 0

    def take(self, app: Any, message_id: str, priority: int) -> bool:
        with self.ready:
            if len(self.waiting) >= HAND_OVER_WAITING_MAX:
                return False
            self.waiting.append((app, message_id, priority))
            if len(self.threads) < HAND_OVER_THREADS and len(self.threads) <= self.sending:
                thread = threading.Thread(target=self._run, name=f"hand-over-{len(self.threads)}", daemon=True)
                self.threads.append(thread)
                thread.start()
            self.ready.notify()
        return True

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.waiting:
                    if is_stopping():
                        return
                    self.ready.wait(0.5)
                if is_stopping():
                    # Not sent here: the next worker takes them from the queue, now.
                    handed, self.waiting = self.waiting, []
                else:
                    app = self.waiting[0][0]
                    limit = int(app.config["SEND_BATCH"])
                    handed = [item for item in self.waiting if item[0] is app][:limit]
                    self.waiting = [item for item in self.waiting if item not in handed]
                self.sending += 1
            try:
                _send_handed_over(handed)
            finally:
                with self.ready:
                    self.sending -= 1
                    self.ready.notify_all()

    def drain(self, timeout: float) -> None:
        """Wait (up to `timeout`) until no hand-over thread is sending: the worker is stopping."""
        deadline = time.monotonic() + timeout
        with self.ready:
            self.ready.notify_all()
            while (self.sending or self.waiting) and time.monotonic() < deadline:
                self.ready.wait(min(0.5, max(deadline - time.monotonic(), 0)))


_hand_over = _HandOver()


def take_at_once(message_id: str, priority: int) -> bool:
    """Send a message just committed (a turn's reply) on this process's hand-over threads, without
    a trip through the queue; False when HAND_OVER_REPLIES is off, the worker is stopping or too
    many wait already (the outbox then enqueues it). Registered with outbox.register_hand_over by
    the tasks module."""
    if not current_app.config.get("HAND_OVER_REPLIES") or is_stopping():
        return False
    return _hand_over.take(current_app._get_current_object(), message_id, priority)  # type: ignore[attr-defined]


def drain_hand_overs(timeout: float) -> None:
    """The worker is stopping: wait for the hand-over threads' sends in flight (shutdown.py)."""
    _hand_over.drain(timeout)


def _send_handed_over(handed: list[tuple[Any, str, int]]) -> None:
    """Claim the handed-over messages in one statement and send them as one batch; what cannot be
    claimed now (an older message to the contact goes first) or must be retried goes on the queue,
    where a send task would have been."""
    if not handed:
        return
    app = handed[0][0]
    priorities = {message_id: priority for _, message_id, priority in handed}
    with app.app_context():
        try:
            if is_stopping():
                claimed: list[sa.Row] = []
            else:
                claimed = claims.claim_many(list(priorities))
            outcomes = send_claimed(claimed) if claimed else {}
            for message_id, priority in priorities.items():
                outcome = outcomes.get(message_id)
                if outcome is None or outcome == Outcome.RELEASED:
                    if outcome is None:  # not claimed: its task finds out why (its turn, sent already)
                        outbox.enqueue(outbox.Work.SEND, message_id, outbox.Priority(priority))
                elif outcome == Outcome.RETRY:
                    due = db.session.scalar(sa.select(Message.next_attempt_at).where(Message.id == message_id))
                    delay = max((due - utcnow()).total_seconds(), 0) if due is not None else 0
                    outbox.enqueue(outbox.Work.SEND, message_id, outbox.Priority(priority),
                                   delay=timedelta(seconds=delay))
        except Exception:
            log.exception("the sends handed over by turns failed; they go on the queue")
            db.session.rollback()
            for message_id, priority in priorities.items():
                outbox.enqueue(outbox.Work.SEND, message_id, outbox.Priority(priority))


def send_claimed(batch: list[sa.Row]) -> dict[str, Outcome]:
    """Send claimed messages (at most one per contact) at once, whatever their channels; record
    every outcome. By id.

    Three rounds, all on the pool with the lease renewed while they run: messages whose earlier
    attempt may have been accepted are looked up first (found: recorded, not sent; the channel
    may ask to wait); the rest are sent; any send whose fate this attempt left unknown is looked
    up at once where its channel can answer at once.
    """
    outcomes: dict[str, Outcome] = {}
    ready: list[_Send] = []
    held: list[release.SendTimeHold] = []
    recipients = load_recipients({row.contact_id for row in batch})
    rate_keys: dict[str, tuple[str, int]] = {}
    for row in batch:
        if row.attempts > MAX_ATTEMPTS:  # a worker kept dying mid-send: stop, say so
            finish(row.id, MessageStatus.FAILED, None, f"gave up after {MAX_ATTEMPTS} attempts", row.contact_id)
            outcomes[row.id] = Outcome.FAILED
            continue
        channel = CHANNELS.get(row.channel)
        if channel is None:  # a channel this worker was not built with: a deployment error
            log.error("message %s: no channel %r is registered", row.id, row.channel)
            finish(row.id, MessageStatus.FAILED, None, f"no channel {row.channel!r} in this worker", row.contact_id)
            outcomes[row.id] = Outcome.FAILED
            continue
        contact, stop_waiting = recipients[row.contact_id]
        if row.quiet_hours is not None:  # most rows have none: an attribute read, no statement
            until = quiet_until(utcnow(), row.quiet_hours, contact.timezone, current_app.config["DEFAULT_TIMEZONE"])
            if until is not None:
                held.append(release.SendTimeHold(row, until, contact.address_on(row.channel), contact.user_id))
                continue
        request = channel.prepare(row, contact, stop_waiting)
        if isinstance(request, Refusal):
            log.info("message %s refused before %s: %s", row.id, channel.name, request.text)
            metrics.send_outcome(channel.name, "refused", request.code)
            finish(row.id, MessageStatus.FAILED, request.code, request.text, row.contact_id)
            outcomes[row.id] = Outcome.REFUSED
            continue
        if channel.name not in rate_keys:
            rate_keys[channel.name] = (channel.rate_key(), channel.rate_per_second())
        rate_key, rate = rate_keys[channel.name]
        bulk_rate = bulk_share_rate(rate, float(current_app.config["BROADCAST_RATE_SHARE"])) \
            if row.kind == Kind.BROADCAST else None
        ready.append(_Send(row, channel, request, rate_key, rate, bulk_rate))
    if held:
        for item in held:  # release_due enqueues their tasks again: those must run
            _disown(item.row.id)
            outcomes[item.row.id] = Outcome.HELD
        release.hold_at_send(held)
    if not ready:
        return outcomes
    # The providers' clients are read in the app context, before the session is given back.
    channels = {item.channel.name: item.channel for item in ready}
    senders = {name: channel.open_sender() for name, channel in channels.items()}
    # Give the connection back while waiting for rate slots and for the providers: the claims
    # hold the rows, and what was read stays usable, detached (docs/ARCHITECTURE.md). In the bulk
    # process the read ends with COMMIT, which keeps the connection's prepared statements: a quarter
    # to a half less of PostgreSQL's CPU per broadcast send. The worker's own batches end it
    # with a ROLLBACK (psycopg then forgets them): kept there too, the turns' statements on the
    # same connections slowed at the tail beside a broadcast (bench/THROUGHPUT.md, "Broadcasts",
    # twelfth and thirteenth runs).
    if current_app.config["BOT_QUEUE_LANE"] == "bulk":
        close_after_reads()
    else:
        db.session.close()
    renew = claims.lease_renewer([item.row.id for item in ready])
    accepted: list[tuple[_Send, Accepted]] = []

    # 1. An earlier attempt may have been accepted: ask before sending again.
    unsure = [(item, item.row.unsure_since) for item in ready if item.row.unsure_since is not None]
    found = _look_up(unsure, renew, outcomes)
    accepted += [(item, found[item.row.id]) for item, _ in unsure if item.row.id in found]
    to_send = [item for item in ready if item.row.id not in found and item.row.id not in outcomes]

    # 2. Send.
    limit = send_rate_limit()

    def send(item: _Send) -> Any:
        # The slot is taken right before the request leaves, in the pool's thread: taken for the
        # whole batch up front, calls queued in the pool would reach the provider in bursts. A
        # worker told to stop starts no new call (bot/delivery/shutdown.py).
        if is_stopping():
            raise ShuttingDown()
        try:
            acquired = True
            if item.bulk_rate is not None:  # a broadcast's: paced, then its share first (invariant 16)
                share_key = bulk_share_key(item.rate_key)
                acquired = limit.pace(share_key, item.bulk_rate, cancelled=is_stopping) and \
                    metrics.timed_rate_wait(item.channel.name, limit.acquire, share_key,
                                            cancelled=is_stopping, rate=item.bulk_rate)
            acquired = acquired and metrics.timed_rate_wait(
                item.channel.name, limit.acquire, item.rate_key, cancelled=is_stopping, rate=item.rate,
                keep_free=bulk_headroom(item.rate, item.bulk_rate) if item.bulk_rate else 0)
        except Exception as exc:  # a limiter bug, or an error it does not know: nothing has left
            raise NotSent(f"{type(exc).__name__} from the send rate limit") from exc
        if not acquired:
            raise ShuttingDown() if is_stopping() else RateLimitFull()
        if is_stopping():  # a slot the first in line took for it as the worker was told to stop
            raise ShuttingDown()
        return metrics.timed_send(item.channel.name, senders[item.channel.name], item.request, utcnow())

    calls = in_flight.call_all(send, [{"item": item} for item in to_send], concurrency(),
                               every=renew.every, while_waiting=renew)
    unknown: list[tuple[_Send, Unknown]] = []
    for item, call in zip(to_send, calls):
        result = _settle(item, call)
        if isinstance(result, Accepted):
            accepted.append((item, result))
        elif isinstance(result, Unknown):
            unknown.append((item, result))
        else:
            outcomes[item.row.id] = result

    # 3. This attempt's fate is unknown: look at once where the provider answers at once (most
    # often it has it already), unless the worker is stopping: then the row stays unsure and the
    # next worker looks.
    at_once = [] if is_stopping() else [(item, fate.since) for item, fate in unknown if item.channel.looks_up_at_once]
    found = _look_up(at_once, renew, outcomes)
    for item, fate in unknown:
        row = item.row
        if row.id in found:
            log.warning("message %s: %s, but %s had accepted it as %s", row.id, fate.reason, item.channel.name,
                        found[row.id].provider_id)
            accepted.append((item, found[row.id]))
        elif row.id not in outcomes:
            outcomes[row.id] = _failed_attempt(row, fate.http_status, fate.code, fate.reason, transient=True,
                                               unsure_since=fate.since)
    outcomes.update(_record_accepted_many(accepted))
    return outcomes


def _settle(item: _Send, call: in_flight.Call) -> Outcome | Accepted | Unknown:
    """What one call's answer means: accepted, unknown (look it up), or the recorded outcome."""
    row, exc = item.row, call.error
    metrics.send_settled(item.channel.name, call.result, exc)
    if isinstance(exc, ShuttingDown):
        return _release(row)
    if isinstance(exc, RateLimitFull):
        return _failed_attempt(row, None, None, "no slot in the sender's rate limit came free in time "
                               "(full, or its Redis unreachable)", transient=True)
    if isinstance(exc, NotSent):
        log.error("message %s: unexpected error before calling %s", row.id, item.channel.name, exc_info=exc)
        return _failed_attempt(row, None, None, f"not sent: unexpected {exc}", transient=True)
    if exc is not None:
        # A channel's send raises for nothing the provider answers (bot/channels/base.py): this is
        # unrecognised, and may have come after the request left: may have been accepted.
        log.error("message %s: unexpected error from the %s channel", row.id, item.channel.name, exc_info=exc)
        return Unknown(f"unexpected {type(exc).__name__} from the {item.channel.name} channel (see the worker's log)",
                       call.started)
    result = call.result
    if isinstance(result, Accepted):
        log.info("message %s accepted by %s as %s", row.id, item.channel.name, result.provider_id or "(no id)")
        return result
    if isinstance(result, Failed):
        if result.too_fast:
            send_rate_limit().slow_down(item.rate_key, item.rate)
        if result.hold:
            return _hold(row, result)
        return _failed_attempt(row, result.http_status, result.code, result.text, transient=result.retry,
                               max_attempts=result.max_attempts)
    return result  # Unknown


def _release(row: sa.Row) -> Outcome:
    """Give a claimed message that never reached its provider back to the queue: the worker is
    stopping.

    `retrying` ranks with `dispatching` (the status never moves back), due now, the attempt not
    counted; its task is enqueued again for the next worker.
    """
    db.session.execute(
        sa.update(Message).where(Message.id == row.id, Message.status == MessageStatus.DISPATCHING)
        .values(status=MessageStatus.RETRYING, claimed_until=None, next_attempt_at=utcnow(),
                attempts=Message.attempts - 1)
        .execution_options(synchronize_session=False))
    _disown(row.id)
    outbox.defer_send(row.id, row.kind)
    db.session.commit()
    return Outcome.RELEASED


def _look_up(sends: list[tuple[_Send, datetime]], renew: claims.LeaseRenewer,
             outcomes: dict[str, Outcome]) -> dict[str, Accepted]:
    """For each (send, since): the provider's message that is this send, if it has one.

    The channels fetch on the pool and match in this thread. A lookup that fails leaves its row
    `retrying` (still unsure) in `outcomes`, and it is never sent blind; a channel that cannot
    tell yet (`Wait`) leaves it waiting, this attempt not counted.
    """
    if not sends:
        return {}
    fetchers = {item.channel.name: item.channel.open_lookup() for item, _ in sends}

    def fetch(item: _Send) -> Any:
        return fetchers[item.channel.name](item.request)

    calls = in_flight.call_all(fetch, [{"item": item} for item, _ in sends], concurrency(),
                               every=renew.every, while_waiting=renew)
    found: dict[str, Accepted] = {}
    taken: set[str] = set()
    for (item, since), call in zip(sends, calls):
        row = item.row
        if call.error is not None:
            metrics.lookup_answered(item.channel.name, call.error)
            log.warning("message %s: could not ask %s whether an earlier attempt was accepted (%s); "
                        "it will ask again before sending", row.id, item.channel.name, type(call.error).__name__)
            outcomes[row.id] = _failed_attempt(row, None, None,
                                               f"could not look the {item.channel.name} provider up before resending",
                                               transient=True, unsure_since=since)
            continue
        answer = item.channel.match(row, item.request, call.result, since, taken)
        metrics.lookup_answered(item.channel.name, None, answer)
        if isinstance(answer, Accepted):
            taken.add(answer.provider_id)
            found[row.id] = answer
        elif isinstance(answer, Wait):
            outcomes[row.id] = _wait(row, answer.until)
    return found


@functools.cache
def _accepted_statement(provider_id_column: str) -> sa.Update:
    rank = sa.bindparam("rank")
    moves = Message.status_rank < rank  # as raise_status does, in the same statement
    return (sa.update(Message).where(Message.id == sa.bindparam("message_id"))
            .values({provider_id_column: sa.bindparam("provider_id"),
                     "sent_at": sa.bindparam("now"), "updated_at": sa.bindparam("now"), "next_attempt_at": None,
                     "claimed_until": None, "unsure_since": None, "error_code": None,
                     "error_message": sa.bindparam("error_message"),
                     "status": sa.case((moves, sa.bindparam("status")), else_=Message.status),
                     "status_rank": sa.case((moves, rank), else_=Message.status_rank)})
            .execution_options(synchronize_session=False))


def _accepted_values(row: sa.Row, result: Accepted, now: datetime, provider_id: str | None,
                     error_message: str | None = None) -> dict[str, Any]:
    status = MessageStatus(result.status)
    return {"message_id": row.id, "now": now, "provider_id": provider_id, "error_message": error_message,
            "status": status.value, "rank": status.rank}


@functools.cache
def _after_record_statement() -> sa.CompoundSelect:
    """After the ids are committed, in one read: the provider ids among `sids` whose callbacks
    came first (kept unapplied), and the contacts among `contact_ids` who have another message
    waiting (not among `ids`): each row names one or the other."""
    early = (sa.select(StatusEvent.twilio_sid.label("sid"), sa.cast(sa.null(), sa.Integer).label("contact_id"))
             .where(StatusEvent.twilio_sid.in_(sa.bindparam("sids", expanding=True))))
    waiting = (sa.select(sa.cast(sa.null(), sa.String).label("sid"), Message.contact_id)
               .where(Message.contact_id.in_(sa.bindparam("contact_ids", expanding=True)),
                      Message.direction == Direction.OUTBOUND, Message.status == MessageStatus.PENDING,
                      Message.id.not_in(sa.bindparam("ids", expanding=True))))
    return sa.union(early, waiting)  # UNION: each once


def _record_accepted_many(accepted: list[tuple[_Send, Accepted]]) -> dict[str, Outcome]:
    """Record what the providers accepted; their ids stay in memory while the commit is retried.

    A database error right after a provider's 2xx (a failover, a dropped connection, SQLite's
    "database is locked") must not turn into a second message: the commit is retried with
    backoff (RECORD_RETRIES). Should the database stay away longer, the rows keep their claims;
    when the lease runs out, whoever re-takes them looks the provider up and finds these ids.
    """
    if not accepted:
        return {}
    for attempt in range(RECORD_RETRIES + 1):
        try:
            return _record_accepted_rows(accepted)
        except DBAPIError as exc:
            if isinstance(exc, IntegrityError):
                raise  # not the database's health: _record_accepted_rows handles an id seen twice
            db.session.rollback()
            if attempt == RECORD_RETRIES:
                log.error("could not record %d messages their providers accepted (%s); their lease will run "
                          "out and the next attempt looks them up", len(accepted),
                          ", ".join(f"{item.row.id}={result.provider_id}" for item, result in accepted))
                return {item.row.id: Outcome.RETRY for item, _ in accepted}
            delay = 0.25 * 2 ** attempt
            log.warning("database error recording %d accepted sends; retrying in %.2f s", len(accepted), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _record_accepted_rows(accepted: list[tuple[_Send, Accepted]]) -> dict[str, Outcome]:
    """Record the provider ids of a batch (one message or fifty: the replies' hand-over sends
    batches of one) in one round trip per channel with their `message.status` events, commit;
    then, in one read, its early callbacks and who is next."""
    now = utcnow()
    by_column: dict[str, list[dict[str, Any]]] = {}
    for item, result in accepted:
        by_column.setdefault(item.channel.provider_id_column, []).append(
            _accepted_values(item.row, result, now, result.provider_id or None))
    try:
        # Commit the ids first, then look for callbacks that beat us here (see
        # statuses.record_callback). One executemany per column: a single round trip on psycopg 3.
        connection = db.session.connection()
        for column, values in by_column.items():
            connection.execute(_accepted_statement(column), values)
        # Each row was `dispatching` (callbacks wait for its id), so each moved: the backend
        # hears of it in the same commit (invariant 12).
        report_statuses({item.row.id: MessageStatus(result.status) for item, result in accepted})
        db.session.commit()
    except IntegrityError:  # an id already on another row (a mistaken lookup): one by one
        db.session.rollback()
        return {item.row.id: record_accepted(item.row, item.channel, result) for item, result in accepted}
    by_id = {result.provider_id: item.row.id for item, result in accepted
             if item.channel.callbacks_by_provider_id and result.provider_id}
    contacts = {item.row.contact_id: item.row.id for item, _ in accepted}
    found = db.session.connection().execute(_after_record_statement(), {
        "sids": sorted(by_id), "contact_ids": sorted(contacts), "ids": [item.row.id for item, _ in accepted]}).all()
    db.session.commit()
    for provider_id in sorted(row.sid for row in found if row.sid is not None):
        apply_pending_events(provider_id, by_id[provider_id])
    for contact_id in sorted(row.contact_id for row in found if row.contact_id is not None):
        # Most contacts have nobody behind them (release_next's lock is rare).
        release_next(contacts[contact_id], contact_id)
    return {item.row.id: Outcome.SENT for item, _ in accepted}


def record_accepted(row: sa.Row, channel: Channel, result: Accepted) -> Outcome:
    """Record one send `channel`'s provider accepted: its id, its status; then the callbacks that
    beat it here, and the contact's next message. Commits."""

    def record(provider_id: str | None, error_message: str | None = None) -> None:
        db.session.connection().execute(_accepted_statement(channel.provider_id_column),
                                        _accepted_values(row, result, utcnow(), provider_id, error_message))
        # The row was `dispatching` (callbacks wait for its id), so it moved (invariant 12).
        report_statuses({row.id: MessageStatus(result.status)})
        db.session.commit()

    try:
        # Commit the id first, then look for callbacks that beat us here (see
        # statuses.record_callback). Accepted: what an earlier transient attempt noted is history
        # (it is in the worker's log).
        record(result.provider_id or None)
    except IntegrityError:
        # Another row already holds this id (it can only come from a mistaken lookup). The
        # provider did accept a message for this row, so record it as sent rather than resend.
        db.session.rollback()
        log.error("message %s: %s id %s is already recorded on another message", row.id, channel.name,
                  result.provider_id)
        record(None, f"{channel.name} id {result.provider_id} is recorded on another message")
        release_next(row.id, row.contact_id)
        return Outcome.SENT
    if channel.callbacks_by_provider_id and result.provider_id:
        apply_pending_events(result.provider_id, row.id)
    release_next(row.id, row.contact_id)
    return Outcome.SENT


def _failed_attempt(message: Message | sa.Row, http_status: int | None, code: int | None, text: str,
                    transient: bool, unsure_since: datetime | None = None,
                    max_attempts: int | None = None) -> Outcome:
    """Record a failed attempt: `retrying` with a backoff when `transient` and attempts are left
    (`max_attempts`, else MAX_ATTEMPTS), or `failed`.

    `unsure_since`: the attempt may have been accepted (its fate is unknown); the row keeps the
    earliest such time, and its next attempt looks the provider up before sending.
    """
    message_id, attempts = message.id, message.attempts
    if transient and attempts < (max_attempts or MAX_ATTEMPTS):
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
        metrics.retry(message.channel)
        log.warning("message %s: transient failure (HTTP %s, code %s), attempt %d of %d; will retry%s",
                    message_id, http_status, code, attempts, MAX_ATTEMPTS,
                    " after looking the provider up" if unsure_since is not None else "")
        return Outcome.RETRY
    log.warning("message %s failed (HTTP %s, code %s): %s", message_id, http_status, code, text)
    finish(message_id, MessageStatus.FAILED, code, text, message.contact_id)
    return Outcome.FAILED


def _wait(row: sa.Row, until: datetime) -> Outcome:
    """Not sent: its channel cannot tell yet whether an earlier attempt was accepted (SendGrid's
    events have not come); tried again at `until`, this attempt not counted, still unsure."""
    db.session.execute(
        sa.update(Message).where(Message.id == row.id, Message.status == MessageStatus.DISPATCHING)
        .values(status=MessageStatus.RETRYING, claimed_until=None, next_attempt_at=until,
                attempts=Message.attempts - 1).execution_options(synchronize_session=False))
    db.session.commit()
    return Outcome.RETRY


def _hold(row: sa.Row, result: Failed) -> Outcome:
    """The account is at fault (SendGrid's 401): keep the message, try again after HOLD_DELAY,
    never count it against MAX_ATTEMPTS."""
    log.error("the provider refused the account (HTTP %s: %s); messages are held until it is fixed",
              result.http_status, result.text)
    db.session.execute(
        sa.update(Message).where(Message.id == row.id, Message.status == MessageStatus.DISPATCHING)
        .values(status=MessageStatus.RETRYING, claimed_until=None, next_attempt_at=utcnow() + HOLD_DELAY,
                attempts=Message.attempts - 1, error_code=result.code,
                error_message=f"held: {result.text}"[:1000]).execution_options(synchronize_session=False))
    db.session.commit()
    return Outcome.RETRY
