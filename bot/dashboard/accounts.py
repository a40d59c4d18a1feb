"""Operator accounts and their sessions: passwords, sign-in, the one-time development link.

No Flask request here: the sign-in page (bot/dashboard/sign_in.py) and the `flask operator`
commands (bot/dashboard/cli.py) call these.
"""
from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

import sqlalchemy as sa
from werkzeug.security import check_password_hash, generate_password_hash

from bot.clock import utcnow
from bot.extensions import db
from bot.models import Operator, OperatorSession

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
#: Checked against when no account has the address, so a wrong address costs the same time as a
#: wrong password (an attacker cannot list accounts by timing the answer). Written out rather than
#: made at import: one scrypt hash takes 32 MiB while it runs, which was every web and worker
#: process's peak resident memory, and ~0.1 s of its CPU at start (bench/THROUGHPUT.md, "The web's
#: hot path", fourth pass). `generate_password_hash("no account has this password")` with Werkzeug's
#: default method, which tests/dashboard/test_operators.py checks it still is.
DUMMY_HASH = ("scrypt:32768:8:1$hD0Jig7IsFl2xnAL$cb41551f092db0cc6f466c7d6923b3745b0c7a33cac062a879f9875502bc07a9"
              "cf764602a103b3daf72eceb806fe6e25a20be48f28fe1d7fc2c1d9720bb1f0c1")
#: How long development mode's printed sign-in link works.
LOGIN_LINK_LIFETIME = timedelta(hours=24)


class AccountError(ValueError):
    """An account cannot be created or changed as asked; the message says why."""


def normal_email(value: str) -> str:
    """The address as accounts store it (lowercased); AccountError when it is not one."""
    # Imported on a sign-in, not by every web process at start (bench/THROUGHPUT.md, "Web memory").
    from email_validator import EmailNotValidError, validate_email

    try:
        return validate_email(value.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise AccountError(f"not an email address: {exc}") from None


def check_new_password(password: str) -> None:
    """AccountError unless `password` is long enough to resist guessing and short enough to hash."""
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AccountError(f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")


def create_operator(email: str, password: str) -> Operator:
    """A new operator (not committed). AccountError for a bad address, a short password, or an
    address that already has an account."""
    address = normal_email(email)
    check_new_password(password)
    if db.session.scalar(sa.select(Operator.id).where(Operator.email == address)) is not None:
        raise AccountError(f"an operator with this address already exists: {address}")
    operator = Operator(email=address, password_hash=generate_password_hash(password))
    db.session.add(operator)
    return operator


def set_password(operator: Operator, password: str) -> None:
    """A new password (not committed); every session of the operator ends."""
    check_new_password(password)
    operator.password_hash = generate_password_hash(password)
    db.session.execute(sa.delete(OperatorSession).where(OperatorSession.operator_id == operator.id))


def authenticate(email: str, password: str) -> Operator | None:
    """The operator with this address and password, or None (the same time either way)."""
    operator = db.session.scalar(sa.select(Operator).where(Operator.email == email.strip().lower()))
    if operator is None:
        check_password_hash(DUMMY_HASH, password)
        return None
    return operator if check_password_hash(operator.password_hash, password) else None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(operator: Operator, lifetime: timedelta, now: datetime | None = None) -> str:
    """A new session for `operator` (committed): the random token for the cookie. The server
    keeps only its digest, so its table read by someone else opens nothing."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    db.session.add(OperatorSession(id=_digest(token), operator_id=operator.id, created_at=now,
                                   expires_at=now + lifetime))
    operator.last_sign_in_at = now
    # Old sessions of anyone, over: the table holds only live sign-ins.
    db.session.execute(sa.delete(OperatorSession).where(OperatorSession.expires_at <= now))
    db.session.commit()
    return token


def session_operator(token: str | None) -> Operator | None:
    """The operator a cookie's token signs in, while its session lasts."""
    if not token or not isinstance(token, str) or len(token) > 100:
        return None
    return db.session.scalar(
        sa.select(Operator).join(OperatorSession, OperatorSession.operator_id == Operator.id)
        .where(OperatorSession.id == _digest(token), OperatorSession.expires_at > utcnow()))


def close_session(token: str | None) -> None:
    """End the session of this token on the server (committed)."""
    if token and isinstance(token, str):
        db.session.execute(sa.delete(OperatorSession).where(OperatorSession.id == _digest(token)))
        db.session.commit()


def issue_login_link(operator: Operator, now: datetime | None = None) -> str:
    """A one-time sign-in token for development mode (committed); a newer one replaces it."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    operator.login_link_hash = _digest(token)
    operator.login_link_expires_at = now + LOGIN_LINK_LIFETIME
    db.session.commit()
    return token


def use_login_link(token: str) -> Operator | None:
    """The operator a one-time token signs in, the token spent; None when it is unknown, used
    or expired. One conditional UPDATE, so two clicks cannot both use it."""
    if not token or len(token) > 100:
        return None
    digest = _digest(token)
    operator_id = db.session.execute(
        sa.update(Operator).where(Operator.login_link_hash == digest, Operator.login_link_expires_at > utcnow())
        .values(login_link_hash=None, login_link_expires_at=None).returning(Operator.id)).scalar_one_or_none()
    db.session.commit()
    return db.session.get(Operator, operator_id) if operator_id is not None else None
