"""Conversation flows: one module per flow, each exposing `flow`; the toolkit they share.

The engine looks flows up by name here. To add one, write `flows/<name>.py` with a module-level
`flow = Flow(...)`, its copy in `templates/<name>/`, and list the module below.
"""
from __future__ import annotations

from importlib import import_module

from flows.toolkit import Flow

#: Modules whose `flow` the engine knows, in the order their entry points are tried.
FLOW_MODULES = ("flows.welcome", "flows.appointment", "flows.feedback")


def registry() -> dict[str, Flow]:
    """Every flow by name."""
    flows = [import_module(name).flow for name in FLOW_MODULES]
    return {flow.name: flow for flow in flows}
