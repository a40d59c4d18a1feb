"""The Twilio simulator in a process of its own, for benchmarks that time what reaches it.

In the load generator's process the simulator's request handlers share one interpreter with the
generator's threads (the open-loop senders, the RSS sampler, the result reads), so a create
arriving while they run is stamped late: the "reply written → at the simulator" segment grew
beside a broadcast partly because the simulator had 60 more creates a second to stamp in that
same interpreter (bench/THROUGHPUT.md, "Broadcasts", sixth run). Twilio is a remote service; its
stand-in is one process, its own, here. The benchmark reads what it recorded over a pipe.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from typing import Any


class SimulatorProcess:
    """A `TwilioSimulator` started in a child process; `url`, `pid`, `timings`, `webhooks`,
    `reset()` and `stop()` as the in-process object offers them (what bench/broadcast.py and
    bench/throughput.py's `--simulator-process` use)."""

    def __init__(self, keep_alive: bool = False, nice: int = 0, **options: Any) -> None:
        """Start the child with `TwilioSimulator(**options)`; with `keep_alive`, its API is served
        by waitress, which keeps connections open as Twilio's API does (`_keep_alive_url`).
        `nice`: the child's niceness, below 0 only with the privilege (else it stays at 0);
        `niceness` says which it got."""
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(target=_serve, args=(child, options, keep_alive, nice),
                                        name="twilio-simulator", daemon=True)
        self._process.start()
        child.close()
        self.url: str
        self.niceness: int
        self.url, self.niceness = self._conn.recv()
        self.pid = self._process.pid

    def _ask(self, what: str) -> Any:
        with self._lock:
            self._conn.send(what)
            return self._conn.recv()

    @property
    def timings(self) -> list[dict[str, Any]]:
        """Each create the simulator received, in arrival order (its own clock: this machine's)."""
        return self._ask("timings")

    @property
    def webhooks(self) -> list[dict[str, Any]]:
        """Each webhook the simulator posted (status callbacks included), as `TwilioSimulator.webhooks`."""
        return self._ask("webhooks")

    @property
    def pauses(self) -> list[list[float]]:
        """The child's garbage collections over 5 ms: [epoch s, generation, ms] each."""
        return self._ask("pauses")

    def reset(self) -> None:
        """Forget what was recorded (as `TwilioSimulator.reset`)."""
        self._ask("reset")

    def stop(self) -> None:
        """Stop the simulator and its process."""
        if self._process.is_alive():
            try:
                self._ask("stop")
            except (EOFError, OSError):
                pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


#: How often the child sets what it has recorded aside from the garbage collector (`_freezer`).
FREEZE_EVERY_SECONDS = 1.0
#: A collection longer than this is recorded (`pauses`).
PAUSE_RECORDED_SECONDS = 0.005


def _freezer(stop: threading.Event) -> None:
    """Keep what the simulator records (every create, request and timing, tens of thousands of
    dicts over a run, alive until `reset`) out of the garbage collector's scans: a full
    collection over them stopped the stand-in for 50-150 ms, stamping every create arriving
    meanwhile that much late, which a reply's latency then counted (bench/THROUGHPUT.md,
    "Broadcasts", tenth run). Twilio's own pauses are not this server's."""
    while not stop.wait(FREEZE_EVERY_SECONDS):
        gc.freeze()


def _pause_recorder(pauses: list[list[float]]) -> Any:
    """A gc callback recording each collection over PAUSE_RECORDED_SECONDS: [epoch s, generation, ms]."""
    started: dict[str, float] = {}

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started["at"] = time.perf_counter()
        elif "at" in started:
            took = time.perf_counter() - started.pop("at")
            if took > PAUSE_RECORDED_SECONDS:
                pauses.append([round(time.time(), 3), info["generation"], round(took * 1000, 1)])

    return record


#: waitress's threads for the API with `keep_alive`: each create holds one for the simulated
#: latency (150 ms), and 80 creates a second then hold about 12.
KEEP_ALIVE_THREADS = 48


def _keep_alive_url(sim: Any) -> str:
    """Serve the simulator's API again, from waitress on a port of its own, and return that URL.

    werkzeug's development server (what `TwilioSimulator.start` runs, and every test uses) ends
    every connection after its answer: each create then costs both sides a connect and a close,
    and the simulator a new thread, which Twilio's API (keep-alive) does not make the worker pay.
    The werkzeug server stays up (the simulator's other parts start with it); only this URL is
    handed out."""
    from waitress.server import create_server

    server = create_server(sim._wsgi_app, host="127.0.0.1", port=0, threads=KEEP_ALIVE_THREADS,
                           connection_limit=500, channel_timeout=300, ident="twilio-simulator")
    threading.Thread(target=server.run, name="waitress", daemon=True).start()
    return f"http://127.0.0.1:{server.effective_port}"


def _serve(conn: Any, options: dict[str, Any], keep_alive: bool = False, nice: int = 0) -> None:
    """The child: run the simulator, answer the parent's reads until told to stop."""
    from bot.devtools.simulator import TwilioSimulator

    try:
        os.nice(nice)
    except PermissionError:  # a negative niceness needs CAP_SYS_NICE: the stand-in stays at 0
        pass
    pauses: list[list[float]] = []
    gc.callbacks.append(_pause_recorder(pauses))
    stop = threading.Event()
    threading.Thread(target=_freezer, args=(stop,), name="freezer", daemon=True).start()
    sim = TwilioSimulator(**options).start()
    conn.send((_keep_alive_url(sim) if keep_alive else sim.url, os.nice(0)))
    while True:
        try:
            what = conn.recv()
        except EOFError:  # the benchmark ended without a stop
            sim.stop()
            return
        if what == "timings":
            conn.send(sim.timings)
        elif what == "webhooks":
            conn.send(sim.webhooks)
        elif what == "pauses":
            conn.send(list(pauses))
        elif what == "reset":
            sim.reset()
            gc.unfreeze()  # what reset dropped can be collected again
            conn.send(None)
        elif what == "stop":
            sim.stop()
            conn.send(None)
            return
