"""Mermaid state diagrams drawn from flow declarations (`flask flows graph`)."""
from __future__ import annotations

from flows.toolkit import END, Flow

_START = "[*]"


def _node(state: str) -> str:
    return _START if state == END else state


def _label(text: str) -> str:
    # Mermaid treats ':' as the label separator and chokes on some punctuation.
    return text.replace(":", " ").replace(";", ",").replace('"', "'").strip()


def mermaid(flow: Flow) -> str:
    """A `stateDiagram-v2` of the flow: entry points, routes, fallbacks and the timeout."""
    lines = ["stateDiagram-v2", f"    %% flow: {flow.name}"]
    edges: list[tuple[str, str, str]] = []
    for target in flow.start_to:
        edges.append((_START, _node(target), "start"))
    for entry in flow.entry_points:
        for target in entry.to:
            edges.append((_START, _node(target), entry.label))
    for state, routes in flow.states.items():
        for each in routes:
            for target in each.to:
                edges.append((state, _node(target), each.label))
        for fallback in flow.fallbacks:
            for target in fallback.to:
                edges.append((state, _node(target), f"otherwise ({fallback.label})"))
        if flow.timeout:
            for target in flow.timeout_to or (END,):
                edges.append((state, _node(target), f"no answer for {_duration(flow.timeout.total_seconds())}"))
    seen = set()
    for source, target, label in edges:
        if (source, target, label) in seen:
            continue
        seen.add((source, target, label))
        lines.append(f"    {source} --> {target}" + (f": {_label(label)}" if label else ""))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 60)}min"
