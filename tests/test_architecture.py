"""Structural tests: invariants of the code's shape, read from the source with `ast`.

None of these needs the app. Each failure names the offending files and lines, so the message is the to-do list.
"""
from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOT = ROOT / "bot"
FLOWS = ROOT / "flows"


# --------------------------------------------------------------------------------------------
# Helpers: files, module names, docstrings, imports
# --------------------------------------------------------------------------------------------

def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _python_files(directory: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Every .py under `directory`, minus those under the excluded sub-directories (relative to ROOT)."""
    files = []
    for path in sorted(directory.rglob("*.py")):
        rel = _rel(path)
        if "__pycache__" in path.parts or any(rel.startswith(prefix.rstrip("/") + "/") for prefix in exclude):
            continue
        files.append(path)
    return files


def _module_name(path: Path) -> str:
    """bot/http/notify.py -> bot.http.notify; bot/__init__.py -> bot; wsgi.py -> wsgi."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings: the first statement of a module, class or
    function when it is a bare string."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                ids.add(id(first.value))
    return ids


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement anywhere in the tree (module level, functions, classes, try/except),
    except the bodies of `if TYPE_CHECKING:` blocks (their `else:` still counts)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve_base(importer: str, importer_is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = importer.split(".") if importer_is_package else importer.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _imported_modules(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(project module, line) for each project module the file imports.

    `import a.b.c` -> a.b.c (the deepest project module of the dotted name; no edge to a or a.b).
    `from a.b import x` -> a.b.x when that is a module, else a.b.
    """
    importer = _module_name(path)
    found: list[tuple[str, int]] = []
    for node in _import_nodes(_parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                for end in range(len(parts), 0, -1):
                    candidate = ".".join(parts[:end])
                    if candidate in modules:
                        found.append((candidate, node.lineno))
                        break
        else:
            base = _resolve_base(importer, _is_package(path), node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                if alias.name != "*" and submodule in modules:
                    found.append((submodule, node.lineno))
                elif base in modules:
                    found.append((base, node.lineno))
    return [(target, line) for target, line in found if target != importer]


def _strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to worry about)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle_through(start: str, graph: dict[str, set[str]], within: set[str]) -> list[str] | None:
    """The shortest path start -> ... -> start inside `within` (BFS), as a list of nodes."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & within):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if successor not in seen:
                seen.add(successor)
                previous[successor] = node
                queue.append(successor)
    return None


# --------------------------------------------------------------------------------------------
# 1. Import cycles
# --------------------------------------------------------------------------------------------

def _project_import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    files = _python_files(BOT, exclude=("bot/migrations",)) + _python_files(FLOWS)
    if (ROOT / "wsgi.py").exists():
        files.append(ROOT / "wsgi.py")
    by_module = {_module_name(path): path for path in files}
    modules = set(by_module)
    graph: dict[str, set[str]] = {module: set() for module in modules}
    sites: dict[tuple[str, str], list[str]] = {}
    for module, path in by_module.items():
        for target, line in _imported_modules(path, modules):
            graph[module].add(target)
            site = f"{_rel(path)}:{line}"
            if site not in sites.setdefault((module, target), []):
                sites[(module, target)].append(site)
    return graph, sites


def test_no_import_cycle_among_project_modules() -> None:
    """No two project modules (bot/, flows/, wsgi.py; not bot/migrations/) import each other,
    directly or through others.

    Every import counts, including the lazy ones inside functions: a function-level import that
    closes a loop only hides the cycle until someone moves it to the top of the file (or imports
    the modules in another order). Imports under `if TYPE_CHECKING:` do not count. Importing
    `bot.x.y` is an edge to bot.x.y only, not to its parent packages. `bot/__init__.py` imports
    most of the app inside create_app(), so a submodule importing from the `bot` package itself
    (`from bot import create_app`, or `from bot import name` where name is not a submodule) closes
    a cycle, and is reported like any other.
    """
    graph, sites = _project_import_graph()
    cyclic = [component for component in _strongly_connected_components(graph) if len(component) > 1]
    if not cyclic:
        return
    report = []
    for component in sorted(cyclic):
        members = set(component)
        report.append(f"strongly connected: {', '.join(component)}")
        cycles: list[list[str]] = []
        for start in component:
            cycle = _shortest_cycle_through(start, graph, members)
            if cycle is None:
                continue
            # The same loop found from another member: compare its rotation starting at the least node.
            ring = cycle[:-1]
            pivot = ring.index(min(ring))
            canonical = ring[pivot:] + ring[:pivot]
            if canonical + [canonical[0]] not in cycles:
                cycles.append(canonical + [canonical[0]])
        for cycle in cycles:
            report.append("  " + " -> ".join(cycle))
            for a, b in zip(cycle, cycle[1:]):
                report.append(f"      {a} -> {b}: {', '.join(sites[(a, b)])}")
    pytest.fail("import cycles among project modules:\n" + "\n".join(report), pytrace=False)


# --------------------------------------------------------------------------------------------
# 2. Runtime never imports the development tools
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# 3. The engine names no flow
# --------------------------------------------------------------------------------------------

def _string_constants(tree: ast.AST) -> Iterator[ast.Constant]:
    """Every str constant that is not a docstring, f-string pieces included."""
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def _flow_modules() -> set[str]:
    """The modules that define a flow: those listed in flows.FLOW_MODULES, and any flows/*.py with
    a module-level `flow = ...`."""
    import flows

    found = set(getattr(flows, "FLOW_MODULES", ()))
    for path in _python_files(FLOWS):
        for statement in _parse(path).body:
            targets = (statement.targets if isinstance(statement, ast.Assign)
                       else [statement.target] if isinstance(statement, ast.AnnAssign) else [])
            if any(isinstance(target, ast.Name) and target.id == "flow" for target in targets):
                found.add(_module_name(path))
    return found


def test_engine_names_no_flow() -> None:
    """The conversation engine and the delivery layer are generic: they look flows up in
    flows.registry() and never name one. No string constant in bot/conversations/ or
    bot/delivery/ (docstrings excepted) equals or contains a registered flow's name, and none of
    those modules imports a specific flow module (flows.welcome, ...): flows.toolkit and the
    flows package (the registry) are the only ways in."""
    import flows

    names = sorted(flows.registry())
    assert names, "flows.registry() is empty"
    flow_modules = _flow_modules()
    files = _python_files(BOT / "conversations") + _python_files(BOT / "delivery")
    assert BOT / "conversations" / "engine.py" in files, "bot/conversations/engine.py missing"
    modules = {_module_name(path) for path in _python_files(FLOWS)} | flow_modules
    offences = []
    for path in files:
        tree = _parse(path)
        for constant in _string_constants(tree):
            for name in names:
                if name in constant.value:
                    how = "is" if constant.value == name else "contains"
                    offences.append(f"{_rel(path)}:{constant.lineno}: {constant.value!r} {how} flow name {name!r}")
        for target, line in _imported_modules(path, modules):
            if target in flow_modules:
                offences.append(f"{_rel(path)}:{line}: imports flow module {target}")
    if offences:
        offences.sort(key=lambda line: (line.split(":")[0], int(line.split(":")[1]), line))
        pytest.fail("the engine/delivery layer names specific flows:\n" + "\n".join(offences), pytrace=False)


# --------------------------------------------------------------------------------------------
# 4. No bare status literals
# --------------------------------------------------------------------------------------------

#: Names that, as a keyword argument, an attribute, a variable or a dict key, hold a status.
STATUS_NAMES = frozenset({"status", "consent", "new_state", "final_status"})
#: SQLAlchemy's membership tests: `Message.status.in_((...))`.
IN_METHODS = frozenset({"in_", "not_in", "notin_"})


def _literals(expr: ast.expr | None) -> Iterator[ast.Constant]:
    """The str constants an expression *is*: itself, the elements of a tuple/list/set, either
    branch of `a if c else b`, the operands of `a or b`. Nothing deeper (no calls, no subscripts)."""
    if expr is None:
        return
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        yield expr
    elif isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
        for element in expr.elts:
            yield from _literals(element)
    elif isinstance(expr, ast.IfExp):
        yield from _literals(expr.body)
        yield from _literals(expr.orelse)
    elif isinstance(expr, ast.BoolOp):
        for value in expr.values:
            yield from _literals(value)


def _named_status(target: ast.expr) -> bool:
    return ((isinstance(target, ast.Attribute) and target.attr in STATUS_NAMES)
            or (isinstance(target, ast.Name) and target.id in STATUS_NAMES))


def _status_positions(tree: ast.AST) -> Iterator[ast.Constant]:
    """The str constants in positions that mean a status (see test_no_bare_status_literals)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                yield from _literals(operand)
        elif isinstance(node, ast.keyword) and node.arg in STATUS_NAMES:
            yield from _literals(node.value)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if _named_status(target):
                    yield from _literals(node.value)
                elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) \
                        and len(target.elts) == len(node.value.elts):
                    for element, value in zip(target.elts, node.value.elts):
                        if _named_status(element):
                            yield from _literals(value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in STATUS_NAMES:
                    yield from _literals(value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in IN_METHODS and _named_status(node.func.value):
            for argument in node.args:
                yield from _literals(argument)
        elif isinstance(node, ast.MatchValue):
            yield from _literals(node.value)


#: What bot/vocabulary.py is to define (used only to report offenders while it is missing).
PLANNED_VALUES = frozenset({
    "pending", "dispatching", "retrying", "accepted", "scheduled", "queued", "sending", "sent",
    "delivered", "undelivered", "failed", "canceled", "read", "received", "processed",
    "unknown", "opted_in", "opted_out",
    "starting", "active", "completed", "expired", "cancelled",
})


def _bare_status_literals(values: frozenset[str]) -> list[str]:
    files = _python_files(BOT, exclude=("bot/migrations", "bot/devtools"))
    offences = []
    for path in files:
        if path == BOT / "vocabulary.py":
            continue
        for constant in _status_positions(_parse(path)):
            if constant.value in values:
                offences.append(f"{_rel(path)}:{constant.lineno}: {constant.value!r}")
    return sorted(set(offences), key=lambda line: (line.split(":")[0], int(line.split(":")[1]), line))


def test_no_bare_status_literals() -> None:
    """Statuses are spelled once, in bot/vocabulary.py (MessageStatus, ConversationStatus,
    Consent); everywhere else in bot/ the code uses the enum members, so a typo is a NameError
    instead of a query that silently matches nothing.

    The heuristic flags a str constant equal to one of those enums' values only where the code
    means a status:
      - an operand of a comparison (`x == "sent"`, `x in ("sent", "read")`, `x != "failed"`),
        elements of a literal tuple/list/set operand included;
      - the value of a keyword argument named status, consent, new_state or final_status
        (this covers `.values(status=...)` and `Message(status=...)`);
      - the value assigned to an attribute or variable named status or consent, tuple unpacking
        included (`row.status, row.rank = "failed", 6`);
      - the value of a "status"/"consent" key in a dict literal;
      - the argument of `<...>.status.in_(...)` (SQLAlchemy membership);
      - a `case "sent":` pattern.
    "The expression's value" means the constant itself, the elements of a literal tuple/list/set,
    either branch of `a if c else b`, and the operands of `a or b`, nothing deeper. Docstrings,
    log and error messages, SQL text, dict lookups (`RANK["sent"]`) and positional arguments are
    not looked at. Exempt: bot/vocabulary.py, bot/migrations/ (frozen history) and bot/devtools/
    (the simulator speaks Twilio's wire strings on purpose).
    """
    if not (BOT / "vocabulary.py").exists():
        found = _bare_status_literals(PLANNED_VALUES)
        pytest.fail("bot/vocabulary.py missing (MessageStatus, ConversationStatus, Consent, Direction, Kind)"
                    + ("; with the planned values these literals would be flagged:\n" + "\n".join(found)
                       if found else ""), pytrace=False)
    from bot import vocabulary

    missing = [name for name in ("MessageStatus", "Consent", "Direction", "Kind", "ConversationStatus")
               if not hasattr(vocabulary, name)]
    assert not missing, f"bot/vocabulary.py does not define {', '.join(missing)}"
    values = frozenset(str(member.value) for enum in (vocabulary.MessageStatus, vocabulary.ConversationStatus,
                                                      vocabulary.Consent) for member in enum)
    found = _bare_status_literals(values)
    if found:
        pytest.fail("bare status literals (use the bot.vocabulary enums):\n" + "\n".join(found), pytrace=False)


# --------------------------------------------------------------------------------------------
# 5. Role packages import downward only: delivery knows no conversation, channels know no role
# --------------------------------------------------------------------------------------------

#: The one delivery module that may import the conversations package: the tasks module is the
#: composition root (it wires the engine and the channels into the queue).
COMPOSITION_ROOT = "bot.delivery.tasks"


def _imports_into(package: Path, forbidden: tuple[str, ...], allowed: frozenset[str] = frozenset()) -> list[str]:
    graph, sites = _project_import_graph()
    offences = []
    for path in _python_files(package):
        module = _module_name(path)
        if module in allowed:
            continue
        for target in sorted(graph.get(module, ())):
            if target.startswith(forbidden):
                offences.append(f"{module} -> {target}: {', '.join(sites[(module, target)])}")
    return offences


def test_delivery_imports_nothing_of_conversations() -> None:
    """bot/conversations imports bot/delivery (the outbox, the events), never the reverse: what
    both need (the contact's lock, whether a STOP waits) lives below them in bot/contacts.py, and
    the tasks module alone wires the engine in (docs/ARCHITECTURE.md, "The channel seam")."""
    offences = _imports_into(BOT / "delivery", ("bot.conversations",), frozenset({COMPOSITION_ROOT}))
    assert not offences, "bot/delivery imports bot/conversations:\n" + "\n".join(offences)


def test_channels_import_no_role_package() -> None:
    """A channel (bot/channels/<name>/) is its provider's edge: it imports its SDK, the models and
    the vocabulary, never the sender, the engine or the HTTP layer that use it."""
    offences = _imports_into(BOT / "channels", ("bot.delivery", "bot.conversations", "bot.http", "bot.devtools"))
    assert not offences, "bot/channels imports a role package:\n" + "\n".join(offences)


#: The generic parts of the channel seam: what every channel shares and the sender may import.
CHANNEL_INTERFACE = ("bot.channels.base", "bot.channels.outcomes")
#: Provider SDKs and HTTP clients: only a channel's package may import them.
PROVIDER_LIBRARIES = ("twilio", "sendgrid", "python_http_client", "requests", "urllib3")


def test_the_sender_imports_no_provider() -> None:
    """bot/delivery/sender.py and claims.py know no provider (docs/ARCHITECTURE.md, "The channel
    seam"): they import no SDK or HTTP client, and of bot/channels only the interface and the
    outcomes; each message's channel is looked up in what the tasks module registered."""
    offences = []
    for path in (BOT / "delivery" / "sender.py", BOT / "delivery" / "claims.py"):
        for node in _import_nodes(_parse(path)):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [_resolve_base(_module_name(path), False, node)])
            for name in names:
                if name.split(".")[0] in PROVIDER_LIBRARIES or (
                        name.startswith("bot.channels") and name not in CHANNEL_INTERFACE):
                    offences.append(f"{_rel(path)}:{node.lineno}: imports {name}")
    assert not offences, "the sender names a provider:\n" + "\n".join(offences)
