"""gunicorn's configuration module (the Procfile's `-c python:bot.gunicorn_config`): the
request histograms of several worker processes add up in one scrape (docs/metrics.md).

prometheus_client's multiprocess mode keeps each worker's samples in files under
PROMETHEUS_MULTIPROC_DIR and sums them at scrape time. The variable must be set before any
worker imports prometheus_client, so it is set here, in the master, when gunicorn reads this
module: to the host's own value when given, else to a fresh directory of the master's. The
directory is emptied when the master starts (a previous run's files would add old counts to new
ones: client_python#568), and a worker that exits has its files marked dead (`child_exit`), so
its gauges drop out while its counts still add up.

It also caps the C allocator's arenas (`limit_malloc_arenas`) before any worker is forked: each
gthread thread would otherwise get an arena of its own, and a worker's resident memory grew by
15-25 MiB under load (bench/THROUGHPUT.md, "The web's hot path", fourth pass).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import tempfile
from typing import Any

#: glibc's mallopt parameter for the most arenas malloc may create (malloc.h: M_ARENA_MAX).
M_ARENA_MAX = -8
#: Arenas for a web process's threads when MALLOC_ARENA_MAX is not set: one for the main
#: thread, one shared by the request threads. Measured against glibc's default (8 per core)
#: in bench/THROUGHPUT.md ("The web's hot path", fourth pass): the CPU per request unchanged.
WEB_MALLOC_ARENAS = 2

_directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
    tempfile.gettempdir(), f"bot-prometheus-{os.getpid()}")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _directory


def limit_malloc_arenas(arenas: int = WEB_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas in this process, and so in every worker it forks (they inherit
    the setting). A host's own MALLOC_ARENA_MAX wins (glibc read it at start). Whether it was set:
    False on a C library without mallopt (musl, macOS), where nothing changes."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


limit_malloc_arenas()


def _clean(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def on_starting(server: Any) -> None:
    """In the master, before any worker: start from an empty directory."""
    _clean(_directory)


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker exited: mark its files dead."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _directory)
