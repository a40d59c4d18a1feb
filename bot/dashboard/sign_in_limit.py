"""Sign-in attempts, limited per account and per address (the `limits` library).

Failed attempts are counted in Redis when REDIS_URL is set, so every web process shares the
count (a brute force spread over gunicorn's workers and dynos meets one limit); in process
memory otherwise (the embedded default is one machine). Once either count is spent, the next
attempt is refused before the password is even checked, the right one included, until the
window has moved on. `limits` is imported on the first sign-in, not with the dashboard: a web
process that never serves one does not carry it (bench/THROUGHPUT.md, "The web's hot path": RSS).
"""
from __future__ import annotations

import threading

from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

if TYPE_CHECKING:
    from limits import RateLimitItem

#: Failed sign-ins allowed for one account, and from one address (many operators may share an
#: office's address, hence the larger number), within the window.
PER_ACCOUNT = "5/15minutes"
PER_ADDRESS = "20/15minutes"
#: Redis calls time out rather than hang a sign-in page.
REDIS_TIMEOUT_SECONDS = 3.0
#: A web process's threads build the limit once between them: two in-memory counts would each allow the limit.
_build_lock = threading.Lock()


class LimitUnavailable(Exception):
    """The count cannot be read (Redis away): sign-in is refused, never allowed unchecked."""


class SignInLimit:
    """Counts failed sign-ins per account and per address under one namespace."""

    def __init__(self, storage_uri: str, namespace: str) -> None:
        from limits import parse
        from limits.errors import StorageError
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        self.per_account, self.per_address = parse(PER_ACCOUNT), parse(PER_ADDRESS)
        self.storage_error: type[Exception] = StorageError
        options: dict[str, Any] = {"wrap_exceptions": True}
        if storage_uri.startswith(("redis", "rediss")):
            options.update(socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri, **options))
        self.namespace = namespace

    def _checks(self, account: str, address: str) -> list[tuple[RateLimitItem, str]]:
        return [(self.per_account, f"account:{account.strip().lower()[:254]}"),
                (self.per_address, f"address:{address[:64]}")]

    def allows(self, account: str, address: str) -> bool:
        """Whether another attempt may be checked now. Raises LimitUnavailable."""
        try:
            return all(self.limiter.test(item, self.namespace, key) for item, key in self._checks(account, address))
        except self.storage_error as exc:
            raise LimitUnavailable(type(getattr(exc, "storage_error", exc)).__name__) from None

    def failed(self, account: str, address: str) -> None:
        """Count a failed attempt against both. Raises LimitUnavailable."""
        try:
            for item, key in self._checks(account, address):
                self.limiter.hit(item, self.namespace, key)
        except self.storage_error as exc:
            raise LimitUnavailable(type(getattr(exc, "storage_error", exc)).__name__) from None

    def clear_account(self, account: str) -> None:
        """Forget the account's failed attempts (an administrator set a new password). Raises
        LimitUnavailable."""
        try:
            self.limiter.clear(self.per_account, self.namespace, self._checks(account, "")[0][1])
        except self.storage_error as exc:
            raise LimitUnavailable(type(getattr(exc, "storage_error", exc)).__name__) from None


def sign_in_limit() -> SignInLimit:
    """The app's limit, built on first use (one per app, so one in-memory count per process)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    with _build_lock:
        limit = app.extensions.get("dashboard_sign_in_limit")
        if limit is None:
            limit = _build(app)
            app.extensions["dashboard_sign_in_limit"] = limit
    return limit


def _build(app: Flask) -> SignInLimit:
    # The queue's name keeps two bots (or two test runs) on one Redis apart.
    return SignInLimit(app.config.get("REDIS_URL") or "memory://", f"dashboard-sign-in:{app.config['QUEUE_NAME']}")
