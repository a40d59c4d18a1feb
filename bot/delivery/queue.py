"""The Huey instance shared by the web process (which enqueues) and the worker (which consumes).

Tasks must be declared at import time, before any app exists, so `huey` is created here with a
storage that refuses to work until `init_app` binds it to Redis (REDIS_URL) or to a SQLite file
under instance/ (the embedded default).
"""
from __future__ import annotations

import datetime
import logging
import os
import struct
import threading
import time
import weakref
from typing import Any, Callable

from flask import Flask
from huey import signals as S
from huey.api import Task
from huey.storage import BaseStorage, PriorityRedisStorage, RedisStorage, SqliteStorage

from bot.config import queue_file
from bot.delivery.shutdown import DrainingHuey
from bot.logmask import mask_handlers

log = logging.getLogger(__name__)

QUEUE_NAME = "whatsapp-bot"
#: The bulk queue's name is the main queue's with this after it (`<QUEUE_NAME>-bulk`).
BULK_SUFFIX = "-bulk"
#: Queue priorities that go to the bulk queue when there is one: a broadcast's sends and its pump
#: turns (bot.delivery.outbox.Priority.BROADCAST and BROADCAST_PUMP; checked there by a test).
BULK_PRIORITIES = frozenset({-10, -9})
#: What a process does once it becomes a consumer (`when_consuming`).
_consumer_setup: list[Callable[[], None]] = []
#: Whether a task would do nothing at all if it ran (`skip_when`); none: every task runs.
_no_op: list[Callable[[Task], bool]] = []
#: Tasks looked at behind one found to do nothing (`MaskedLogHuey.dequeue`): a send batch's
#: others (SEND_BATCH, 50 by default) and a few more.
LOOK_BEHIND = 64


def when_consuming(setup: Callable[[], None]) -> None:
    """Run `setup` when this process becomes the worker (`huey_consumer` creates its consumer),
    before any task: what only the worker needs is loaded there, never in a web process."""
    _consumer_setup.append(setup)


def skip_when(no_op: Callable[[Task], bool]) -> None:
    """Drop, rather than run, a dequeued task for which `no_op(task)` holds: it must be a task
    whose run would have done nothing, touched nothing and returned at once (a send whose message
    a batch of this process holds or settled: `sender.owns`). The worker registers it."""
    _no_op[:] = [no_op]


def _does_nothing(task: Task) -> bool:
    """`skip_when`'s answer for `task`; an error in it runs the task (a task is never lost to it)."""
    try:
        return bool(_no_op[0](task))
    except Exception:
        log.exception("could not tell whether task %s does nothing; it runs", task.id)
        return False


class UnconfiguredStorage(BaseStorage):
    """Fails loudly instead of silently queueing into memory before create_app() ran."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("name", "__class__", "__init__", "__dict__"):
            return object.__getattribute__(self, name)
        raise RuntimeError("the task queue is not configured: call bot.create_app() first")


class PriorityQueueStorage(PriorityRedisStorage):
    """Redis with two lanes (huey's sorted-set queue, higher priority first; docs/ARCHITECTURE.md,
    invariant 16), under its own key: the plain list of earlier versions cannot turn into a sorted
    set in place, and whatever was left in it is put back on the queue by the outbox sweep."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue_key = self.queue_key + ".priority"
        self._held = threading.local()

    def enqueue(self, data: bytes, priority: int | None = None) -> None:
        """huey's own `RedisPriorityQueue.enqueue` — the same ZADD of the same member (an 8-byte
        timestamp, then the message) at the same score — on a connection this thread keeps.

        Every request of the web enqueues one task after its commit (the outbox), and redis-py's
        `zadd` spends most of its CPU around the command: a pool checkout that polls the socket,
        its retry and its observability hooks (bench/THROUGHPUT.md, "The web's hot path": about
        half the enqueue's CPU). A connection held per thread needs none of that. If it fails
        (Redis restarted, a broken socket), it is dropped and this one command goes through
        redis-py's client with its reconnects and retries, as before.
        """
        score = 0 if priority is None else -priority
        member = struct.pack(">Q", int(time.time() * 1e6)) + data
        held = getattr(self._held, "connection", None)
        if held is None or held.pid != os.getpid():  # none yet, or inherited across a fork
            held = _HeldConnection(self.conn.connection_pool)
            self._held.connection = held
        try:
            held.connection.send_command("ZADD", self.queue_key, score, member)
            held.connection.read_response()
        except Exception:
            # An answer half read must not be read by the next command: drop the connection.
            self._held.connection = None
            held.connection.disconnect()
            held.give_back()
            self.conn.zadd(self.queue_key, {member: score})


    def look_behind(self, count: int) -> list[bytes]:
        """The next `count` members of the queue (each an 8-byte timestamp, then the task), first
        first, left where they are."""
        return list(self.conn.zrange(self.queue_key, 0, count - 1))

    def remove(self, members: list[bytes]) -> None:
        """Take these members off the queue (those another consumer took meanwhile are gone
        already: it runs them)."""
        self.conn.zrem(self.queue_key, *members)


class _HeldConnection:
    """One thread's Redis connection, given back to the pool when the thread ends.

    A thread's `threading.local` values go when the thread does, and this with them; its
    finalizer then returns the connection to the pool. Without it every thread that ever
    enqueued kept one of the pool's connections for good (redis-py allows 100): the bulk lane runs
    each pump turn on a thread of its own (bot/delivery/bulk_lane.py), so a worker draining a
    broadcast ran out of connections after about a hundred turns, and every Redis command of the
    process failed with `MaxConnectionsError`.
    """

    __slots__ = ("pid", "connection", "give_back", "__weakref__")

    def __init__(self, pool: Any) -> None:
        self.pid = os.getpid()
        self.connection = pool.get_connection()
        # Called once at most: by the thread's end (or the object's loss), or by an error first.
        self.give_back = weakref.finalize(self, _give_back, pool, self.connection, self.pid)
        self.give_back.atexit = False


def _give_back(pool: Any, connection: Any, pid: int) -> None:
    """Return a held connection to its pool, in the process that took it (a fork's copy of the
    pool is not the one it came from)."""
    if os.getpid() == pid:
        pool.release(connection)


class MaskedLogHuey(DrainingHuey):
    """The worker's Huey: its consumer's own log lines (task failures with their tracebacks, huey's
    warnings) go through the phone-number mask like ours (bot/logmask.py).

    On Redis it also routes by priority (docs/ARCHITECTURE.md, "Broadcasts"): a broadcast's tasks
    (BULK_PRIORITIES) go to the bulk queue, which the worker's bulk process consumes
    (bot/delivery/bulk_process.py), everything else to the main queue, from every process. `storage`
    is the queue this process consumes (the main one; the bulk one in the bulk process); every
    enqueue, and every schedule (a retry's, an eta's: huey puts them in the consuming process's
    storage), goes through `storage_for`, so a bulk task's retry stays on the bulk queue and
    nothing else ever lands there.
    """

    #: The queues by role while there are two ("main", "bulk"); empty: `storage` is the only one.
    queues: dict[str, BaseStorage] = {}

    def storage_for(self, task: Any) -> BaseStorage:
        """The storage `task` is enqueued on or scheduled in: its lane's queue."""
        if not self.queues:
            return self.storage
        return self.queues["bulk" if task.priority in BULK_PRIORITIES else "main"]

    def dequeue(self) -> Any:
        """huey's dequeue, without the tasks that would do nothing (`skip_when`).

        Draining a backlog, each send task claims its own message and up to SEND_BATCH - 1 others
        (docs/ARCHITECTURE.md, "How many sends at once"), whose tasks, right behind it on the
        queue, then only find their message taken. Each of those cost a dequeue (a round trip to
        Redis), its unpickling, huey's run of it and an app context: about a tenth of the worker's
        CPU per send (bench/THROUGHPUT.md, "Issue 17: a send's waits"). So when the task popped is
        one of them, the tasks behind it are looked at in one read, and those that would do
        nothing too are removed in one more: a batch of fifty costs a few round trips, not fifty.
        Dropping such a task is running it: it would have returned without a statement, a send or
        an enqueue; a message given back by its batch is enqueued anew (`sender._disown`)."""
        while True:
            task = super().dequeue()
            if task is None or not _no_op or not _does_nothing(task):
                return task
            storage = self.storage
            if isinstance(storage, PriorityQueueStorage):
                idle = [member for member in storage.look_behind(LOOK_BEHIND) if self._member_does_nothing(member)]
                if idle:
                    storage.remove(idle)

    def _member_does_nothing(self, member: bytes) -> bool:
        try:
            task = self.deserialize_task(member[8:])  # after the member's 8-byte timestamp
        except Exception:  # not ours to judge: left on the queue, where huey's own dequeue reports it
            return False
        return _does_nothing(task)

    def enqueue(self, task: Any) -> Any:
        """huey's enqueue, onto the task's lane's queue (`storage_for`)."""
        target = self.storage_for(task) if isinstance(task, Task) else self.storage
        if target is self.storage or self.immediate:
            return super().enqueue(task)
        # huey's own steps for one task (results are off: nothing to return).
        if task.expires:
            task.resolve_expires(self.utc)
        self._emit(S.SIGNAL_ENQUEUED, task)
        target.enqueue(self.serialize_task(task), task.priority)
        return None

    def add_schedule(self, task: Any) -> None:
        """huey's add_schedule (a retry's delay, an eta not reached yet), in the task's lane's
        storage: the scheduler of the process consuming that queue moves it back when due."""
        target = self.storage_for(task)
        if target is self.storage:
            return super().add_schedule(task)
        eta = task.eta or datetime.datetime.fromtimestamp(0)
        target.add_to_schedule(self.serialize_task(task), eta)
        self._emit(S.SIGNAL_SCHEDULED, task)

    def pending_count(self) -> int:
        """Tasks waiting on every queue (both, when the bulk queue exists)."""
        return sum(self.queue_depths().values())

    def queue_depths(self) -> dict[str, int]:
        """Tasks waiting on each queue, by role: "main", and "bulk" when it exists."""
        if not self.queues:
            return {"main": int(self.storage.queue_size())}
        return {role: int(storage.queue_size()) for role, storage in self.queues.items()}

    def scheduled_count(self) -> int:
        """Tasks scheduled for later in every queue."""
        return sum(int(storage.schedule_size()) for storage in self.storages())

    def flush(self) -> None:
        """Empty every queue (tests)."""
        for storage in self.storages():
            storage.flush_all()

    def storages(self) -> list[BaseStorage]:
        """The queues' storages: the main one first."""
        return list(self.queues.values()) if self.queues else [self.storage]

    def create_consumer(self, **options: Any) -> Any:
        # `huey_consumer` adds its handler to the "huey" logger (or the root, from a script of
        # one's own) after importing the app and right before this call: the first moment
        # there is a handler to mask.
        mask_handlers(logging.getLogger("huey"), logging.getLogger())
        for setup in _consumer_setup:
            setup()
        return super().create_consumer(**options)

    # No task of ours is ever revoked: a message that must not go is settled in its row (the
    # sender reads the row), never by revoking its task. huey still asks Redis for each task it
    # runs whether the task or its kind was revoked, and clears the task's flag after it ran: two
    # round trips per task, as many as dequeuing it (bench/THROUGHPUT.md, "The worker's hot
    # path"). Skipped; revoking is refused rather than silently ignored.

    def is_revoked(self, task: Any, timestamp: Any = None, peek: bool = True) -> bool:
        """Never: nothing revokes (see above); no round trip to the queue's storage."""
        return False

    def delete(self, key: str) -> Any:
        """A task's revocation flag (`r:<id>`) is never set: nothing to clear."""
        if key.startswith("r:"):
            return False
        return super().delete(key)

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        """Refused: this queue does not check revocations (a message is stopped in its row)."""
        raise NotImplementedError("tasks are not revoked here: settle the message's row instead")

    revoke_all = revoke_by_id = revoke


huey = MaskedLogHuey(QUEUE_NAME, results=False, storage_class=UnconfiguredStorage)


def init_app(app: Flask) -> None:
    """Bind the queue to Redis when REDIS_URL is set, else to a SQLite file under instance/.

    Both keep tasks in priority order (SQLite's table is ordered by priority too). On Redis, with
    BULK_WORKER_PROCESS on, a second queue, `<QUEUE_NAME>-bulk`, takes a broadcast's tasks
    (`MaskedLogHuey.storage_for`); the bulk process (BOT_QUEUE_LANE=bulk) consumes that one. On
    SQLite there is one queue: the send rate budget is in the worker's memory there
    (bot/delivery/rate_limit.py), so one worker process is the whole deployment.
    """
    name = app.config.get("QUEUE_NAME", QUEUE_NAME)
    redis_url = app.config.get("REDIS_URL")
    if redis_url:
        storage_class, kwargs = PriorityQueueStorage, {"url": redis_url}
    else:
        storage_class, kwargs = SqliteStorage, {"filename": queue_file(app.instance_path), "timeout": 30}
    # Extra storage options, e.g. tests turn off Redis's blocking pop to drain the queue quickly.
    kwargs.update(app.config.get("HUEY_STORAGE_OPTIONS", {}))
    huey.name = name
    huey.storage_class = storage_class
    huey.storage_kwargs = kwargs
    lane = app.config.get("BOT_QUEUE_LANE") or "main"
    if bulk_queue_enabled(app.config):
        queues = {"main": storage_class(name, **kwargs), "bulk": storage_class(name + BULK_SUFFIX, **kwargs)}
        huey.queues = queues
        huey.storage = queues[lane]
    else:
        if lane != "main":
            raise RuntimeError("BOT_QUEUE_LANE=bulk needs REDIS_URL and BULK_WORKER_PROCESS on")
        huey.queues = {}
        huey.storage = huey.create_storage()
    huey.immediate = bool(app.config.get("HUEY_IMMEDIATE", False))
    app.extensions["huey"] = huey


def bulk_queue_enabled(config: Any) -> bool:
    """Whether a broadcast's tasks have a queue (and a worker process) of their own: on Redis
    with BULK_WORKER_PROCESS on (docs/ARCHITECTURE.md, "Broadcasts")."""
    return bool(config.get("REDIS_URL")) and bool(config.get("BULK_WORKER_PROCESS", False))


def consumed_lane() -> str:
    """The queue this process consumes: "bulk" in the bulk process, else "main"."""
    return "bulk" if huey.queues and huey.storage is huey.queues.get("bulk") else "main"


def queue_backend_name() -> str:
    """'redis' or 'sqlite', for logs and /healthz."""
    return "redis" if isinstance(huey.storage, RedisStorage) else "sqlite"
