"""What a server process keeps for its whole life, set aside from the garbage collector's scans.

CPython's cyclic collector walks every tracked object of a generation it collects, and the
oldest generation holds everything a process loaded to start: modules, classes, SQLAlchemy's
mappers and compiled statements, the SDKs, phonenumbers' metadata, 160,000-180,000 objects in
the worker and its bulk process. A full collection stopped every thread of a process for 90-130
ms on a 2-core machine: about once a second in a bulk process expanding a broadcast, now and
then in the worker, where the turns and replies in flight waited it out: the slowest replies of
a benchmark round came in runs of a few, 50 ms apart, each behind one such pause
(bench/THROUGHPUT.md, "Broadcasts", tenth run). `gc.freeze()` moves what exists once a process is
ready into a permanent generation that no collection scans, after one last full collection so
that nothing frozen is garbage; what the process allocates afterwards is collected as before.
"""
from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze() -> int:
    """Collect once, then exempt every object alive now from later collections (a process that
    has finished starting: the worker once it consumes, a web worker once its app is loaded).
    Returns how many objects are frozen in all (a second call adds what came since)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%d objects left out of the garbage collector's scans (bot/heap.py)", frozen)
    return frozen
