"""Huey tasks. Each takes ids, runs in a fresh app context, and reads its rows from the database.

Following huey's Flask recipe: the app is created once per consumer process (by importing
`wsgi`), and every task body runs inside `app.app_context()` so sessions never leak between tasks.

The web imports this module too, to enqueue these tasks, but runs none of them: what only a task
body needs (the engine, the sender, the broadcasts' pump, the channels and their SDKs) is imported
in the body, and `load_worker` imports and wires it all once this process is a consumer (or a CLI
or test run), so a web process does not carry it (bench/THROUGHPUT.md, "The web's hot path": RSS).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

from flask import Flask
from huey import crontab
from huey.exceptions import RetryTask

from bot.conversations import inbound
from bot.delivery import event_delivery, outbox, release, statuses, ticker, webhook_fallback
from bot.delivery.queue import huey, skip_when, when_consuming

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_app: Flask | None = None

#: How often each consumer looks for held messages whose time has come (one indexed statement).
HOLD_CHECK_SECONDS = 2.0
#: Huey retries of one send: 2, 4, 8, 16, 32 s apart (bounded; then the message is failed).
SEND_RETRIES = 5
#: A pump turn that failed on the bulk lane runs again this long after (as huey's retry_delay).
PUMP_RETRY_SECONDS = 5.0


def init_app(app: Flask) -> None:
    """Remember the app that tasks run in (the last one created in this process)."""
    global _app
    _app = app


def in_app_context(func: F) -> F:
    """Run the task body in a fresh application context and always release its session."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _app is None:
            raise RuntimeError("no app: the consumer must import wsgi (huey_consumer wsgi.huey)")
        with _app.app_context():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@huey.task(retries=SEND_RETRIES, retry_delay=2, retry_backoff=2, context=True)
@in_app_context
def send_message(message_id: str, task: Any = None) -> str:
    """Deliver one outbound message; early transient failures raise, so huey retries them
    within seconds; later ones wait for the outbox sweep (see sender.MAX_ATTEMPTS)."""
    from bot.delivery import sender

    can_retry = task is not None and bool(task.retries)
    is_retry = task is not None and task.retries < SEND_RETRIES  # huey counts retries down
    if task is not None and task.priority == int(outbox.Priority.BROADCAST) and sender.take_bulk(message_id, is_retry):
        return "bulk lane"  # a broadcast's batch waits for its rate slots off the huey threads
    return sender.deliver(message_id, can_retry=can_retry, is_retry=is_retry).value


@huey.task(retries=3, retry_delay=5)
@in_app_context
def process_inbound(message_id: str) -> None:
    """Run one stored inbound message (and any older ones of its contact) through the engine."""
    from bot.conversations import engine

    engine.process_inbound(message_id)


@huey.task(retries=3, retry_delay=5)
@in_app_context
def start_conversation(conversation_id: str) -> None:
    """Start a flow the backend asked for with POST /notify."""
    from bot.conversations import engine

    engine.start_conversation(conversation_id)


@huey.periodic_task(crontab(minute="*"))
@in_app_context
def expire_conversations() -> None:
    """Once a minute: run the timeout of conversations idle past their flow's timeout."""
    from bot.conversations import engine

    if outbox.take_periodic_turn("expire_conversations", interval_seconds=50):
        engine.expire_conversations()


@huey.periodic_task(crontab(minute="*"))
@in_app_context
def sweep_outbox() -> None:
    """Once a minute: re-enqueue what a dead queue or a killed worker left behind."""
    if outbox.take_periodic_turn("sweep_outbox", interval_seconds=50):
        outbox.sweep()
        statuses.apply_orphan_events()
        release.release_due()  # also every few seconds (release_held); this once a minute whatever ticks


@huey.task()
@in_app_context
def release_held() -> int:
    """Every few seconds on each consumer: enqueue held messages whose time has come (invariant 15)."""
    ticker.started(release_held.name)
    return release.release_due()


@huey.task(retries=3, retry_delay=5)
@in_app_context
def deliver_event(event_id: str) -> str:
    """POST one event to EVENTS_WEBHOOK_URL (signed); failures follow event_delivery.SCHEDULE."""
    return event_delivery.deliver(event_id)


@huey.periodic_task(crontab(minute="*"))
@in_app_context
def sweep_events() -> None:
    """Once a minute: re-enqueue event deliveries a dead queue or a killed worker lost."""
    if outbox.take_periodic_turn("sweep_events", interval_seconds=50):
        event_delivery.sweep()


@huey.periodic_task(crontab(minute="*"))
@in_app_context
def expire_handoffs() -> None:
    """Once a minute: give back to the bot the contacts whose handoff ran out."""
    from bot.conversations import engine

    if outbox.take_periodic_turn("expire_handoffs", interval_seconds=50):
        engine.expire_handoffs()


@huey.periodic_task(crontab(minute="17"))
@in_app_context
def prune_events() -> None:
    """Hourly: delete delivered events past EVENTS_RETENTION_DAYS."""
    if outbox.take_periodic_turn("prune_events", interval_seconds=3000):
        event_delivery.prune()


@huey.task(retries=3, retry_delay=10)
@in_app_context
def store_webhook(form: dict[str, str], received_at: float) -> str:
    """Store a webhook the web could not, its database being down (invariant 11). While the
    database stays unreachable, try again (sooner after a blip, once a minute in a long outage)."""
    try:
        return webhook_fallback.store(form, received_at, inbound.store_inbound)
    except Exception as exc:
        if not webhook_fallback.database_unavailable(exc):
            raise  # a bug, not an outage: huey's own few retries, then the traceback in the log
        delay = webhook_fallback.retry_delay(received_at)
        if delay is None:
            log.error("gave up storing queued webhook %s: the database stayed unreachable", form.get("MessageSid"))
            return "abandoned"
        log.warning("database still unavailable (%s); webhook %s tried again in %.0f s",
                    type(exc).__name__, form.get("MessageSid"), delay)
        raise RetryTask(delay=delay) from None


@huey.periodic_task(crontab(minute="*/5"))
@in_app_context
def reconcile_statuses() -> None:
    """Every 5 minutes: ask Twilio about messages whose status callbacks seem lost (invariant 3)."""
    from bot.delivery import reconcile

    if outbox.take_periodic_turn("reconcile_statuses", interval_seconds=240):
        reconcile.reconcile()


@huey.task(retries=3, retry_delay=5)
@in_app_context
def pump_broadcast(broadcast_id: str, token: str | None = None) -> str:
    """One turn of a broadcast: expand a batch of its audience, release a window of its messages
    (bot/broadcasts/pump.py); the turn schedules the next."""
    from flask import current_app

    from bot.broadcasts import pump
    from bot.delivery import bulk_lane
    from bot.extensions import db

    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def run() -> None:
        try:
            pump.pump(broadcast_id, token)
        except Exception:
            # huey's retries, off the queue's threads: the same turn again in a few seconds.
            log.exception("broadcast %s: a pump turn failed; it runs again", broadcast_id)
            db.session.rollback()
            _schedule_pump(broadcast_id, token, PUMP_RETRY_SECONDS)

    def give_back() -> None:
        _schedule_pump(broadcast_id, token, 0.0)

    # A turn steps for seconds, sleeping between its steps: on a thread of the bulk lane's own,
    # not on a huey thread a turn may need, nor behind the sends waiting for lane threads
    # (bot/delivery/bulk_lane.py; invariant 16).
    if int(app.config["BULK_LANE_THREADS"]) and bulk_lane.lane.start(bulk_lane.Work(app, f"pump {broadcast_id}",
                                                                                     run, give_back)):
        return "bulk lane"
    return pump.pump(broadcast_id, token)


@huey.periodic_task(crontab(minute="*"))
@in_app_context
def sweep_broadcasts() -> None:
    """Once a minute: start again the chain of a live broadcast whose chain was lost."""
    from bot.broadcasts import pump

    if outbox.take_periodic_turn("sweep_broadcasts", interval_seconds=50):
        pump.sweep()


def _schedule_pump(broadcast_id: str, token: str | None, delay: float, ahead: bool = True) -> None:
    priority = int(outbox.Priority.BROADCAST_PUMP if ahead else outbox.Priority.BROADCAST)
    if delay <= 0:
        pump_broadcast(broadcast_id, token, priority=priority)
    else:
        pump_broadcast.schedule(args=(broadcast_id, token), delay=delay, priority=priority)


# How the outbox (and the webhook's fallback) enqueue each kind of work they defer: neither
# imports this module.
outbox.register(outbox.Work.SEND, send_message)
outbox.register(outbox.Work.INBOUND, process_inbound)
outbox.register(outbox.Work.CONVERSATION_START, start_conversation)
outbox.register(outbox.Work.EVENT, deliver_event)
outbox.register(outbox.Work.BROADCAST, pump_broadcast)
webhook_fallback.register(store_webhook)
# Held messages are looked for every few seconds: huey's periodic tasks run once a minute at most.
ticker.every(HOLD_CHECK_SECONDS, release_held, priority=int(outbox.Priority.CONVERSATION))


def load_worker() -> None:
    """Import what only tasks run, set up the send rate limit for the app (`init_app`) and wire
    the worker's parts: the sender's channels (bot/channels/base.py: the sender names no
    provider), the hand-over of a turn's replies, the pump's scheduling. Before the first task:
    when this process becomes a consumer (`when_consuming`), or from create_app for the CLI and
    tests, which run tasks in process; never in a web process."""
    from bot.broadcasts import pump
    from bot.channels.email.channel import EmailChannel
    from bot.channels.whatsapp.channel import WhatsAppChannel
    from bot.conversations import engine  # noqa: F401  (loaded before the first task, not during it)
    from bot.delivery import bulk_lane, rate_limit, reconcile, sender, shutdown  # noqa: F401

    if _app is not None:
        rate_limit.init_app(_app)
    if not sender.CHANNELS:  # once per process
        # The tasks of messages a batch of this process took along are dropped as they are
        # dequeued, not run one by one (bot/delivery/queue.py, MaskedLogHuey.dequeue).
        skip_when(lambda task: isinstance(task, send_message.task_class) and bool(task.args)
                  and sender.owns(task.args[0]))
        sender.register_channel(WhatsAppChannel())
        sender.register_channel(EmailChannel())
        pump.register(_schedule_pump)
        # A turn's replies go straight to this worker's sender when it can take them (outbox.hand_over_sends).
        outbox.register_hand_over(sender.take_at_once)
        shutdown.register_drain(sender.drain_hand_overs)
        # A broadcast's work on the bulk lane: what has not started goes back to the queue.
        shutdown.register_drain(bulk_lane.lane.drain)


def warm_sender() -> None:
    """Once this process is a consumer: the channels' clients are built before the first task
    (`sender.warm`), never in a web process."""
    from bot.delivery import sender

    if _app is not None:
        with _app.app_context():
            sender.warm()


def start_bulk_process() -> None:
    """Once this process is a consumer: the worker starts its bulk process beside it, or this
    is the bulk process and sets itself up (bot/delivery/bulk_process.py)."""
    from bot.delivery import bulk_process

    if _app is not None:
        bulk_process.on_consuming(_app.config)


def freeze_heap() -> None:
    """Last, once this process is a consumer: what it loaded to start is left out of the
    garbage collector's scans from now on (bot/heap.py)."""
    from bot import heap

    heap.freeze()


when_consuming(load_worker)
when_consuming(warm_sender)
when_consuming(start_bulk_process)
when_consuming(freeze_heap)
