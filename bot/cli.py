"""Flask CLI commands: `flask flows graph|list`, `flask doctor`.

`flask chat` is not here: the `flask` command finds it through the "flask.commands" entry point
(pyproject.toml), so the web and worker processes, which call init_app, never import the
terminal chat and the simulator (bot.devtools)."""
from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup

from flows import registry
from flows.diagram import mermaid

flows_cli = AppGroup("flows", help="Inspect the conversation flows.")


@flows_cli.command("graph")
@click.argument("name", required=False)
def graph(name: str | None) -> None:
    """Print a Mermaid state diagram of flow NAME (default: every flow)."""
    flows = registry()
    if name is not None and name not in flows:
        raise click.BadParameter(f"unknown flow {name!r}; flows: {', '.join(flows)}", param_hint="NAME")
    for flow in ([flows[name]] if name else flows.values()):
        click.echo(f"%% {flow.name}: {flow.description}" if flow.description else f"%% {flow.name}")
        click.echo(mermaid(flow))
        click.echo()


@flows_cli.command("list")
def list_flows() -> None:
    """List the flows, what starts them and their timeout."""
    for flow in registry().values():
        starts = [s for s, ok in (("start()", flow.start is not None), ("entry points", bool(flow.entry_points))) if ok]
        click.echo(f"{flow.name:<14} starts with {' and '.join(starts):<26} timeout {flow.timeout}")


@click.command("doctor")
def doctor_command() -> None:
    """Check the configuration (variables, webhook URL, database, Redis, Twilio credentials).

    Also runs without a loadable app: `python -m bot.doctor`.
    """
    from bot.doctor import main

    raise SystemExit(main())


def init_app(app: Flask) -> None:
    """Register the commands."""
    app.cli.add_command(flows_cli)
    app.cli.add_command(doctor_command)
