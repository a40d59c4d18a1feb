"""bot/heap.py: what is alive at the freeze is set aside; garbage is collected before it and after."""
from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from bot import heap


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """A two-node cycle no one refers to any more; a weak reference to one node."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


@pytest.fixture
def frozen() -> Iterator[None]:
    """Freezing this test process's heap is undone afterwards."""
    try:
        yield
    finally:
        gc.unfreeze()


def test_freeze_collects_first_then_sets_aside_everything_alive(frozen):
    before = cycle()
    count = heap.freeze()
    assert before() is None  # garbage at the freeze was collected, not frozen for good
    # This process's modules and objects; frozen ones a reference count frees still leave the
    # permanent generation (a log record's, say), so the count read afterwards may be a few lower.
    assert count > 10_000 and gc.get_freeze_count() > count * 0.99


def test_what_a_process_allocates_after_the_freeze_is_still_collected(frozen):
    heap.freeze()
    after = cycle()
    gc.collect()
    assert after() is None
