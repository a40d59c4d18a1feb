"""GET /metrics: the Prometheus text format, behind its own token (METRICS_TOKEN).

Bearer (`Authorization: Bearer $METRICS_TOKEN`) or basic auth with the token as the password
(Prometheus's `basic_auth`, any username). No token configured: a 404, so nothing leaks by
default. The backend's NOTIFY_API_TOKEN does not open it, and METRICS_TOKEN opens nothing else.
What is served: docs/metrics.md.
"""
from __future__ import annotations

import base64
import binascii
import hmac

from flask import Blueprint, Response, current_app, jsonify, request

bp = Blueprint("metrics_api", __name__)


def _presented_token() -> str | None:
    """The token the request carries, bearer or basic auth's password; None without one."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


@bp.get("/metrics")
def metrics():
    """Every family of docs/metrics.md, read now; 401 without the token, 404 when none is set."""
    expected = current_app.config.get("METRICS_TOKEN")
    if not expected:
        return jsonify(error="not found"), 404
    presented = _presented_token()
    if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
        response = jsonify(error="missing or invalid metrics token (bearer, or basic auth's password)")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="metrics"'
        return response
    # Imported on the first scrape, not with the app: a process that is never scraped (and one
    # with no METRICS_TOKEN) never loads prometheus_client's exposition (docs/libraries.md).
    from bot.metrics.exposition import CONTENT_TYPE, render

    return Response(render(), status=200, content_type=CONTENT_TYPE)
