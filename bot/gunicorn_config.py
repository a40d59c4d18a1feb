"""gunicorn's configuration module (the Procfile's `-c python:bot.gunicorn_config`): the
request histograms of several worker processes add up in one scrape (docs/metrics.md).

prometheus_client's multiprocess mode keeps each worker's samples in files under
PROMETHEUS_MULTIPROC_DIR and sums them at scrape time. The variable must be set before any
worker imports prometheus_client, so it is set here, in the master, when gunicorn reads this
module: to the host's own value when given, else to a fresh directory of the master's. The
directory is emptied when the master starts (a previous run's files would add old counts to new
ones: client_python#568), and a worker that exits has its files marked dead (`child_exit`), so
its gauges drop out while its counts still add up.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import Any

_directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
    tempfile.gettempdir(), f"bot-prometheus-{os.getpid()}")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _directory


def _clean(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def on_starting(server: Any) -> None:
    """In the master, before any worker: start from an empty directory."""
    _clean(_directory)


def post_worker_init(worker: Any) -> None:
    """In each worker, once its app is loaded: what it loaded is left out of the garbage
    collector's scans from now on (bot/heap.py)."""
    from bot import heap

    heap.freeze()


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker exited: mark its files dead."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _directory)
