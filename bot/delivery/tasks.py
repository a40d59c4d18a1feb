"""Huey tasks. Each takes ids, runs in a fresh app context, and reads its rows from the database.

Following huey's Flask recipe: the app is created once per consumer process (by importing
`wsgi`), and every task body runs inside `app.app_context()` so sessions never leak between tasks.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

from flask import Flask
from huey import crontab

from bot.conversations import engine
from bot.delivery import event_delivery, outbox, sender, statuses
from bot.delivery.queue import huey

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_app: Flask | None = None

#: Huey retries of one send: 2, 4, 8, 16, 32 s apart (bounded; then the message is failed).
SEND_RETRIES = 5


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
    can_retry = task is not None and bool(task.retries)
    is_retry = task is not None and task.retries < SEND_RETRIES  # huey counts retries down
    return sender.deliver(message_id, can_retry=can_retry, is_retry=is_retry).value


@huey.task(retries=3, retry_delay=5)
@in_app_context
def process_inbound(message_id: str) -> None:
    """Run one stored inbound message (and any older ones of its contact) through the engine."""
    engine.process_inbound(message_id)


@huey.task(retries=3, retry_delay=5)
@in_app_context
def start_conversation(conversation_id: str) -> None:
    """Start a flow the backend asked for with POST /notify."""
    engine.start_conversation(conversation_id)


@huey.periodic_task(crontab(minute="*"))
@in_app_context
def expire_conversations() -> None:
    """Once a minute: run the timeout of conversations idle past their flow's timeout."""
    if outbox.take_periodic_turn("expire_conversations", interval_seconds=50):
        engine.expire_conversations()


@huey.periodic_task(crontab(minute="*"))
@in_app_context
def sweep_outbox() -> None:
    """Once a minute: re-enqueue what a dead queue or a killed worker left behind."""
    if outbox.take_periodic_turn("sweep_outbox", interval_seconds=50):
        outbox.sweep()
        statuses.apply_orphan_events()


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
    if outbox.take_periodic_turn("expire_handoffs", interval_seconds=50):
        engine.expire_handoffs()


@huey.periodic_task(crontab(minute="17"))
@in_app_context
def prune_events() -> None:
    """Hourly: delete delivered events past EVENTS_RETENTION_DAYS."""
    if outbox.take_periodic_turn("prune_events", interval_seconds=3000):
        event_delivery.prune()


# How the outbox enqueues each kind of work it defers (it never imports this module).
outbox.register(outbox.Work.SEND, send_message)
outbox.register(outbox.Work.INBOUND, process_inbound)
outbox.register(outbox.Work.CONVERSATION_START, start_conversation)
outbox.register(outbox.Work.EVENT, deliver_event)
