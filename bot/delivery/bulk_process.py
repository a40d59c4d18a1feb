"""The bulk process: a broadcast's work in a worker process of its own (docs/ARCHITECTURE.md,
"Broadcasts"; invariant 16).

On Redis, a broadcast's tasks have a queue of their own, `<QUEUE_NAME>-bulk` (bot/delivery/queue.py
routes them by priority from every process). The worker (the Procfile's `huey_consumer
wsgi.huey`), once it is a consumer, starts the same command as its child with BOT_QUEUE_LANE=bulk:
that child consumes the bulk queue on BULK_WORKER_THREADS huey threads of its own, without
periodic tasks, at a lower CPU priority. A broadcast's send batches and pump turns then hold
neither the worker's interpreter (its GIL) nor, when the CPU is short, the CPU its turns and
replies need: on one interpreter, a reply's p99 beside a broadcast was 2.6-3.2 times its p99 alone
(bench/THROUGHPUT.md, "Broadcasts", sixth run).

Nothing is lost when either process dies: a broadcast's sends are claimed rows with leases and
its pump chain is restarted by the broadcasts' sweep (docs/ARCHITECTURE.md, "Broadcasts"). The
worker forwards its graceful stop to the child and waits for it (`shutdown.register_drain`),
restarts a child that died on its own (after a back-off), and a SIGKILLed worker takes its child
with it (PR_SET_PDEATHSIG): no orphan keeps consuming.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from bot.delivery import shutdown, ticker

log = logging.getLogger(__name__)

#: The environment variable that makes a process the bulk one (create_app reads it as a setting).
LANE_VARIABLE = "BOT_QUEUE_LANE"
#: The worker's pid, which the child checks once its death signal is armed (see `become_child`).
PARENT_VARIABLE = "BOT_BULK_PARENT_PID"
#: The child's own stop: within the worker's wait for it (shutdown.DRAIN_SECONDS, 24 s), itself
#: within the Procfile's --shutdown-timeout 25 and a host's 30 s before SIGKILL.
CHILD_SHUTDOWN_SECONDS = 20
#: Niceness added in the child, where SCHED_IDLE (below) is not to be had: under CPU contention
#: the kernel's fair scheduler gives a nice-10 process about a tenth of a nice-0 one's share, so
#: the worker's turns and replies get the CPU first; an idle CPU is still the broadcast's whole.
NICENESS = 10
#: On Linux the child's threads also run under SCHED_IDLE: they get a CPU the worker (and the
#: web, PostgreSQL and Redis beside it on one machine) leaves idle, and the kernel counts a CPU
#: running only them as idle when it places a waking thread, so a turn's or a reply's thread
#: takes it at once instead of queueing behind a broadcast's send. Nice 10 alone still shared the
#: CPU by weight: beside a broadcast a reply's p99 was 1.21-1.56 times its p99 alone, under
#: SCHED_IDLE 1.08-1.29, six runs each alternated (bench/THROUGHPUT.md, "Broadcasts", ninth run). A
#: broadcast on a saturated machine therefore waits for it; it is never starved outright (an
#: idle-class thread keeps a sliver of the CPU: its leases are renewed, its claims kept).
IDLE_CLASS = True
#: A child that died on its own is started again after this long, doubling up to RESTART_MAX
#: while it keeps dying early (a broken deploy must not spin the CPU).
RESTART_FIRST = 1.0
RESTART_MAX = 60.0
#: A child that ran this long before dying starts again after RESTART_FIRST.
RESTART_RESET_AFTER = 120.0
#: prctl(2)'s option: the signal this process gets when the thread that started it ends.
PR_SET_PDEATHSIG = 1


def command(threads: int) -> list[str]:
    """The child's command line: the Procfile's worker command through this interpreter, on
    `threads` huey threads, periodic tasks left to the worker (they run once per deployment)."""
    return [sys.executable, "-m", "huey.bin.huey_consumer", "wsgi.huey", "--workers", str(threads),
            "--worker-type", "thread", "--graceful-signal", "TERM",
            "--shutdown-timeout", str(CHILD_SHUTDOWN_SECONDS), "--no-periodic"]


class BulkChild:
    """The worker's bulk process: started, watched and restarted from a thread of its own, which
    lives as long as the child does (the death signal is tied to the thread that started it)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="bulk-process", daemon=True)

    def start(self) -> None:
        """Start the child now and watch it."""
        self._watcher.start()

    def pid(self) -> int | None:
        """The running child's pid (for tests and the log)."""
        with self._lock:
            return self.process.pid if self.process is not None else None

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, LANE_VARIABLE: "bulk", PARENT_VARIABLE: str(os.getpid())}
        # stdout and stderr inherited: the child's lines go where the worker's go, masked by the
        # child's own handlers (the same create_app and MaskedLogHuey as the worker's).
        return subprocess.Popen(command(self.threads), env=env, close_fds=True)

    def _watch(self) -> None:
        delay = RESTART_FIRST
        try:
            while not self._stopping.is_set():
                with self._lock:
                    if self._stopping.is_set():
                        return
                    started = time.monotonic()
                    try:
                        self.process = self._spawn()
                    except OSError as exc:  # tried again below, as for a child that died at once
                        self.process = None
                        log.error("could not start the bulk process (%s)", type(exc).__name__)
                if self.process is not None:
                    log.info("bulk process %d started: a broadcast's work runs there", self.process.pid)
                    code: int | str = self.process.wait()
                else:
                    code = "not started"
                if self._stopping.is_set():
                    log.info("bulk process exited (%s)", code)
                    return
                if time.monotonic() - started >= RESTART_RESET_AFTER:
                    delay = RESTART_FIRST
                # Nothing it held is lost (claims run out, the sweeps re-enqueue): start another.
                log.warning("bulk process exited unexpectedly (%s); starting another in %.0f s", code, delay)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, RESTART_MAX)
        finally:
            self._done.set()

    def stop(self, timeout: float) -> None:
        """The worker is stopping: pass the graceful stop on to the child and wait for it (up to
        `timeout`); its sends on the wire are answered and recorded, its waiting work goes back
        to the bulk queue (registered with shutdown.register_drain)."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("bulk process still stopping after %.0f s", timeout)
        self._done.wait(1.0)


#: The worker's bulk process (None elsewhere, and when there is none).
child: BulkChild | None = None


def start_child(threads: int) -> BulkChild:
    """Start the bulk process beside this worker and stop it with this worker."""
    global child
    child = BulkChild(threads)
    shutdown.register_drain(child.stop)
    child.start()
    return child


def become_child() -> None:
    """Set up this process as the bulk process, before its first task (`when_consuming`)."""
    _die_with_parent()
    _lower_priority()
    # The worker's scheduler enqueues the tasks that run every few seconds (bot/delivery/ticker.py),
    # onto the main queue; this process runs none of them, nor the periodic tasks (--no-periodic).
    ticker.TICKS.clear()
    # Stopped by the worker (its forwarded SIGTERM) and maybe by the host too (a SIGTERM to every
    # process): the second must not cut short the first's drain (shutdown.DrainingConsumer).
    shutdown.DrainingConsumer.repeated_stop_interrupts = False
    shutdown.DRAIN_SECONDS = float(CHILD_SHUTDOWN_SECONDS)
    log.info("bulk process consuming the bulk queue (parent %s)", os.environ.get(PARENT_VARIABLE))


def _lower_priority() -> None:
    """Niceness +NICENESS and, on Linux, the SCHED_IDLE class for every thread of this process
    (see NICENESS and IDLE_CLASS for why). Linux keeps both per thread: this thread's are set
    first, and the threads it starts inherit them; the threads already running (started while the
    app loaded) are set one by one. Lowering either needs no privilege."""
    try:
        os.nice(NICENESS)
    except OSError:  # not allowed here: it still runs, at the worker's priority
        log.warning("bulk process: could not lower its CPU priority")
        return
    idle = IDLE_CLASS and hasattr(os, "SCHED_IDLE")
    target = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: one niceness per process (this thread's is it)
        return
    for tid in sorted(threads, key=lambda tid: tid != threading.get_native_id()):  # this one first
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
            if idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # the thread ended meanwhile (or the class is refused: niceness holds)
            continue


def _die_with_parent() -> None:
    """Ask Linux for a SIGTERM when the worker dies (a graceful stop of our own: its sends on the
    wire are recorded), and exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                log.warning("bulk process: prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        except (OSError, AttributeError):
            log.warning("bulk process: no prctl; it will not stop with a killed worker")
    parent = os.environ.get(PARENT_VARIABLE)
    # The worker may have died before the signal was armed: then this process is already an orphan.
    if parent and os.getppid() != int(parent):
        log.warning("bulk process: its worker is gone; exiting")
        os._exit(0)


def on_consuming(config: Any) -> None:
    """This process became a consumer: the bulk process sets itself up; the worker starts its
    bulk process when a broadcast's tasks have a queue of their own (bot/delivery/queue.py)."""
    from bot.delivery.queue import bulk_queue_enabled, consumed_lane

    if consumed_lane() == "bulk":
        become_child()
    elif bulk_queue_enabled(config):
        start_child(int(config["BULK_WORKER_THREADS"]))
