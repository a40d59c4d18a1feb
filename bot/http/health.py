"""GET /healthz: 200 when the database and the queue answer, 503 naming the one that does not."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, current_app, jsonify

from bot.extensions import db
from bot.delivery.queue import huey, queue_backend_name

bp = Blueprint("health", __name__)


def _check(name: str, probe) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:
        # The exception text can carry connection strings; log it, answer only its kind.
        current_app.logger.warning("health check: %s unavailable (%s)", name, type(exc).__name__)
        return f"unavailable ({type(exc).__name__})"


@bp.get("/healthz")
def healthz():
    """Probe the database with SELECT 1 and the queue (each queue) with a length query."""
    database = _check("database", lambda: db.session.execute(sa.text("SELECT 1")))
    db.session.rollback()
    depths: dict[str, int] = {}
    queue = _check("queue", lambda: depths.update(huey.queue_depths()))
    healthy = database == "ok" and queue == "ok"
    body = {"status": "ok" if healthy else "unavailable", "database": database, "queue": queue,
            "queue_backend": queue_backend_name()}
    if queue == "ok":
        # Tasks waiting per queue: "main", and "bulk" (a broadcast's tasks) when it has its own.
        body["queue_depth"] = depths
    return jsonify(body), 200 if healthy else 503
