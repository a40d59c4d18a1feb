"""`flask operator create <email>`, `flask operator password <email>`, `flask operator dev-link`."""
from __future__ import annotations

import secrets

import click
import sqlalchemy as sa
from flask import Flask, current_app
from flask.cli import AppGroup

from bot.dashboard import accounts
from bot.dashboard.sign_in_limit import LimitUnavailable, sign_in_limit
from bot.devmode import dev_web_url
from bot.extensions import db
from bot.models import Operator

operator_cli = AppGroup("operator", help="Dashboard operators (docs/dashboard.md).")

#: Development mode's operator, created by `dev-link` (example.com is reserved: nobody's mailbox).
DEV_OPERATOR = "developer@example.com"


@operator_cli.command("create")
@click.argument("email")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              help=f"at least {accounts.MIN_PASSWORD_CHARS} characters (prompted when not given)")
def create(email: str, password: str) -> None:
    """Create an operator who signs in to /dashboard with EMAIL and a password."""
    try:
        operator = accounts.create_operator(email, password)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None
    db.session.commit()
    click.echo(f"operator {operator.email} created; sign in at /dashboard/sign-in")


@operator_cli.command("password")
@click.argument("email")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
def password(email: str, password: str) -> None:
    """Set a new password for EMAIL (every session of theirs ends)."""
    operator = db.session.scalar(sa.select(Operator).where(Operator.email == email.strip().lower()))
    if operator is None:
        raise click.ClickException(f"no operator {email}")
    try:
        accounts.set_password(operator, password)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None
    db.session.commit()
    try:  # a locked-out operator may sign in again at once
        sign_in_limit().clear_account(operator.email)
    except LimitUnavailable:
        click.echo("(the failed sign-ins could not be forgotten: Redis is unreachable)", err=True)
    click.echo(f"password of {operator.email} changed")


@operator_cli.command("dev-link")
def dev_link() -> None:
    """Development mode only: print a one-time link that signs the development operator in."""
    if not current_app.config.get("DEV_MODE"):
        raise click.ClickException("one-time sign-in links are for development mode only; "
                                   "use `flask operator create <email>`")
    operator = db.session.scalar(sa.select(Operator).where(Operator.email == DEV_OPERATOR))
    if operator is None:
        # A password nobody knows: this account signs in through the printed links only.
        operator = accounts.create_operator(DEV_OPERATOR, secrets.token_urlsafe(32))
        db.session.commit()
    token = accounts.issue_login_link(operator)
    click.echo(f"{dev_web_url()}/dashboard/sign-in/link/{token}")


def init_app(app: Flask) -> None:
    """Register the commands."""
    app.cli.add_command(operator_cli)
