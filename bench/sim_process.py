"""The Twilio simulator in a process of its own, for benchmarks that time what reaches it.

In the load generator's process the simulator's request handlers share one interpreter with the
generator's threads (the open-loop senders, the RSS sampler, the result reads), so a create
arriving while they run is stamped late: the "reply written → at the simulator" segment grew
beside a broadcast partly because the simulator had 60 more creates a second to stamp in that
same interpreter (bench/THROUGHPUT.md, "Broadcasts", sixth run). Twilio is a remote service; its
stand-in is one process, its own, here. The benchmark reads what it recorded over a pipe.
"""
from __future__ import annotations

import multiprocessing
import threading
from typing import Any


class SimulatorProcess:
    """A `TwilioSimulator` started in a child process; `url`, `pid`, `timings`, `webhooks`,
    `reset()` and `stop()` as the in-process object offers them (what bench/broadcast.py and
    bench/throughput.py's `--simulator-process` use)."""

    def __init__(self, **options: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(target=_serve, args=(child, options), name="twilio-simulator", daemon=True)
        self._process.start()
        child.close()
        self.url: str = self._conn.recv()
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


def _serve(conn: Any, options: dict[str, Any]) -> None:
    """The child: run the simulator, answer the parent's reads until told to stop."""
    from bot.devtools.simulator import TwilioSimulator

    sim = TwilioSimulator(**options).start()
    conn.send(sim.url)
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
        elif what == "reset":
            sim.reset()
            conn.send(None)
        elif what == "stop":
            sim.stop()
            conn.send(None)
            return
