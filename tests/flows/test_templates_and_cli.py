"""Message copy and the flows CLI."""
from __future__ import annotations

from pathlib import Path

import pytest
from jinja2 import meta

from bot.conversations.replies import TEMPLATES_DIR, environment, render
from flows import registry
from flows.diagram import mermaid

#: Example values where a template needs more than a string (it compares numbers, say).
EXAMPLES = {"rating": 4, "attempts": 2, "max_attempts": 3}

ALL_TEMPLATES = sorted(str(p.relative_to(TEMPLATES_DIR).with_suffix("")) for p in TEMPLATES_DIR.rglob("*.txt"))


def test_every_flow_has_its_copy_folder():
    for name in registry():
        assert (TEMPLATES_DIR / name).is_dir(), f"templates/{name}/ is missing"


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_every_template_renders_with_example_variables(app, template):
    source = (TEMPLATES_DIR / f"{template}.txt").read_text()
    needed = meta.find_undeclared_variables(environment().parse(source)) - {"business"}
    variables = {name: EXAMPLES.get(name, f"<{name}>") for name in needed}
    with app.app_context():
        text = render(template, variables)
    assert text.strip(), f"{template} rendered empty"
    for name in needed - set(EXAMPLES):
        assert f"<{name}>" in text or "{%" in source, f"{template} does not show {name}"
    assert "{{" not in text and "{%" not in text


def test_undefined_variables_are_errors(app):
    from jinja2 import UndefinedError

    with app.app_context(), pytest.raises(UndefinedError):
        environment().from_string("Hello {{ nobody }}").render()


def test_user_text_in_a_variable_stays_text(app):
    with app.app_context():
        assert render("subscription/opted_in", {"name": "{{ 7*7 }}"}).count("{{ 7*7 }}") == 1


@pytest.mark.parametrize("name", sorted(registry()))
def test_flows_graph_prints_a_mermaid_diagram_of_each_flow(app, name):
    result = app.test_cli_runner().invoke(args=["flows", "graph", name])
    assert result.exit_code == 0, result.output
    assert "stateDiagram-v2" in result.output
    flow = registry()[name]
    for state in flow.states:
        assert f"{state} -->" in result.output, f"state {state} has no way out in the diagram"
    assert "[*] -->" in result.output


def test_flows_graph_without_name_prints_all_and_rejects_unknown(app):
    runner = app.test_cli_runner()
    output = runner.invoke(args=["flows", "graph"]).output
    assert output.count("stateDiagram-v2") == len(registry())
    bad = runner.invoke(args=["flows", "graph", "nope"])
    assert bad.exit_code != 0 and "unknown flow" in bad.output


def test_diagram_follows_declared_routes():
    text = mermaid(registry()["feedback"])
    assert "rating --> comment: 1-5" in text
    assert "[*] --> rating: feedback|survey" in text


def test_the_conversations_page_shows_each_flows_current_diagram():
    page = (Path(__file__).resolve().parents[2] / "docs" / "conversations.md").read_text()
    for name, flow in registry().items():
        assert mermaid(flow) in page, (f"docs/conversations.md's diagram of {name} is stale: paste "
                                       f"`flask flows graph {name}`")
