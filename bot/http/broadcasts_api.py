"""Broadcasts: POST /broadcasts to send one message to many, GET /broadcasts/<id> for its counts,
POST /broadcasts/<id>/cancel to stop it.

The request only stores: the broadcast, its audience as listed (one INSERT … SELECT on
PostgreSQL) and its Idempotency-Key, in one commit, then defers the pump. Resolving the
audience and sending are the worker's (bot/broadcasts/; docs/delivery.md, "Broadcasts").
"""
from __future__ import annotations

from datetime import datetime

from flask import Blueprint, abort, current_app, jsonify, request, url_for
from sqlalchemy.exc import IntegrityError

from bot.broadcasts import pump
from bot.broadcasts.audience import store_targets
from bot.broadcasts.counts import broadcast_dict
from bot.channels.email.copy import email_templates
from bot.delivery import outbox
from bot.extensions import db
from bot.http.auth import require_api_token
from bot.http.broadcast_schema import MAX_BROADCAST_BYTES, BroadcastRequest, parse_broadcast, send_at_utc
from bot.http.notify import accepted_response, idempotency_key, read_json_body
from bot.http.schemas import InvalidRequest
from bot.models import Broadcast, IdempotencyKey, is_public_id
from bot.vocabulary import BroadcastState, IdempotentKind

bp = Blueprint("broadcasts_api", __name__)


def _error(status: int, message: str):
    return jsonify(error=message), status


def _accepted(broadcast_id: str, replayed: bool = False):
    """202 with the broadcast's id, its state and where to read its counts."""
    broadcast = db.session.get(Broadcast, broadcast_id)
    url = url_for("broadcasts_api.get_broadcast", broadcast_id=broadcast_id)
    return accepted_response(jsonify(id=broadcast_id, state=broadcast.state, targets=broadcast.targets,
                                     tags=broadcast.tags or [], url=url), url, replayed)


def _replay(key: str, fingerprint: str):
    """The first answer for a reused Idempotency-Key (one key space with /notify), a 422 for
    another payload, or None when the key is new."""
    used = db.session.get(IdempotencyKey, key)
    if used is None:
        return None
    if used.request_hash != fingerprint or used.kind != IdempotentKind.BROADCAST:
        return _error(422, "this Idempotency-Key was already used with a different payload")
    return _accepted(used.target_id, replayed=True)


@bp.post("/broadcasts")
@require_api_token
def create_broadcast():
    """Store a broadcast and its audience; 202 at once (the worker resolves and sends it)."""
    request.max_content_length = MAX_BROADCAST_BYTES
    if not request.is_json:
        return _error(415, "Content-Type must be application/json")
    payload = read_json_body()
    if payload is None:
        return _error(400, "the body is not valid JSON")
    try:
        asked = parse_broadcast(payload, current_app.config["TWILIO_CONTENT_SIDS"], email_templates())
        send_at = send_at_utc(asked.send_at)
    except InvalidRequest as exc:
        return _error(400, str(exc))
    try:
        key = idempotency_key()
    except InvalidRequest as exc:
        return _error(400, str(exc))
    if key is not None:
        fingerprint = asked.fingerprint()  # once: 100,000 entries take a while to hash
        replay = _replay(key, fingerprint)
        if replay is not None:
            return replay
    broadcast = _store(asked, send_at, key, fingerprint if key else None)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        replay = _replay(key, fingerprint) if key else None
        if replay is None:
            raise
        return replay
    return _accepted(broadcast.id)


def _store(asked: BroadcastRequest, send_at: datetime | None, key: str | None, fingerprint: str | None) -> Broadcast:
    """The broadcast, its listed audience and its Idempotency-Key; the pump deferred. No commit."""
    broadcast = Broadcast(
        state=BroadcastState.SCHEDULED if send_at is not None else BroadcastState.EXPANDING,
        channel=asked.channel, subject=asked.subject, body=asked.body, template=asked.template,
        content_sid=asked.content_sid, variables=asked.variables or None, tags=list(asked.tags) or None,
        backend_metadata=asked.metadata, send_at=send_at, idempotency_key=key,
        quiet_hours=(asked.quiet_hours if asked.quiet_hours is not None
                     else str(current_app.config.get("QUIET_HOURS") or "")) or None,
        request_hash=fingerprint, skipped={})
    outbox.defer(outbox.Work.BROADCAST, broadcast, outbox.Priority.BROADCAST_PUMP)  # assigns its id
    db.session.add(broadcast)
    if key:
        db.session.add(IdempotencyKey(key=key, kind=IdempotentKind.BROADCAST, target_id=broadcast.id,
                                      request_hash=fingerprint))
    db.session.flush()  # the broadcast before its audience (a foreign key)
    broadcast.targets = store_targets(broadcast.id, asked.user_ids, asked.phones)
    return broadcast


def _found(broadcast_id: str) -> Broadcast:
    if not is_public_id(broadcast_id):
        abort(404, description=f"no broadcast with id {broadcast_id[:64]!r}")
    broadcast = db.session.get(Broadcast, broadcast_id)
    if broadcast is None:
        abort(404, description=f"no broadcast with id {broadcast_id!r}")
    return broadcast


@bp.get("/broadcasts/<broadcast_id>")
@require_api_token
def get_broadcast(broadcast_id: str):
    """A broadcast's state and counts: recipients, skipped by reason, queued, sent, delivered,
    read, failed by error code, and the same by channel."""
    return jsonify(broadcast_dict(_found(broadcast_id)))


@bp.post("/broadcasts/<broadcast_id>/cancel")
@require_api_token
def cancel_broadcast(broadcast_id: str):
    """Stop a broadcast: nothing more leaves; what already left is reported. 200 with the
    counts; 409 for one that already completed."""
    _found(broadcast_id)
    db.session.rollback()  # the cancel locks the row first thing in its own transaction
    broadcast = pump.cancel(broadcast_id)
    if broadcast is None:
        abort(404, description=f"no broadcast with id {broadcast_id!r}")
    if broadcast.state == BroadcastState.COMPLETED:
        return _error(409, "the broadcast already completed: every message has left")
    return jsonify(broadcast_dict(broadcast))
