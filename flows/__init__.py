"""Conversation flows: one module per flow, each exposing `flow`; the toolkit they share.

The engine looks flows up by name here. To add one, write `flows/<name>.py` with a module-level
`flow = Flow(...)`, its copy in `templates/<name>/`, and list the module below.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import import_module
from types import MappingProxyType

from flows.toolkit import Flow

#: Modules whose `flow` the engine knows, in the order their entry points are tried.
FLOW_MODULES = ("flows.welcome", "flows.appointment", "flows.feedback")


@lru_cache(maxsize=1)
def registry() -> Mapping[str, Flow]:
    """Every flow by name, in FLOW_MODULES order; checked once, then cached.

    The engine calls this for every message, so it is built once per process; the mapping is
    read-only because every caller shares it. `registry.cache_clear()` rebuilds it (tests that
    change FLOW_MODULES).
    """
    return validated(import_module(name).flow for name in FLOW_MODULES)


def validated(flows: Iterable[Flow]) -> Mapping[str, Flow]:
    """`flows` by name, read-only, after checking that they can run together.

    Raises ValueError when two flows share a name (one would silently hide the other) or more
    than one has `on_first_contact` (the engine could not tell which to start).
    """
    by_name: dict[str, Flow] = {}
    for flow in flows:
        if flow.name in by_name:
            raise ValueError(f"two flows are named {flow.name!r}")
        by_name[flow.name] = flow
    first_contact = [name for name, flow in by_name.items() if flow.on_first_contact]
    if len(first_contact) > 1:
        raise ValueError(f"only one flow may run on first contact; these all do: {', '.join(first_contact)}")
    return MappingProxyType(by_name)
