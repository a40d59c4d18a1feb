"""POST /messages/<id>/cancel: a message that has not left yet never will (invariant 15: a held
message can be called back until its time). POST /conversations/<id>/cancel: the same for a
backend-started flow that has not started (docs/ARCHITECTURE.md, "Scheduled flows")."""
from __future__ import annotations

from flask import Blueprint, abort, jsonify

from bot.conversations.scheduled import CancelStart, cancel_start
from bot.delivery.release import Cancel, cancel
from bot.http.auth import require_api_token
from bot.models import is_public_id
from bot.vocabulary import MessageStatus

bp = Blueprint("cancel_api", __name__)


@bp.post("/messages/<message_id>/cancel")
@require_api_token
def cancel_message(message_id: str):
    """200 with the message, now `canceled` (again 200 if it already was); 409 once it left or
    is leaving (claimed by a send, accepted, failed); 404 for an unknown id."""
    if not is_public_id(message_id):
        abort(404, description=f"no message with id {message_id[:64]!r}")
    outcome, message = cancel(message_id)
    if outcome == Cancel.NOT_FOUND:
        abort(404, description=f"no outbound message with id {message_id!r}")
    if outcome == Cancel.TOO_LATE:
        why = ("it is being sent right now" if message.status in (MessageStatus.DISPATCHING, MessageStatus.RETRYING)
               else f"it is already {message.status}")
        return _too_late(why, message.status, message.id)
    return jsonify(message.to_dict())


@bp.post("/conversations/<conversation_id>/cancel")
@require_api_token
def cancel_conversation(conversation_id: str):
    """200 with the conversation, now `cancelled` (again 200 if the backend already canceled
    it); 409 once it started or ended; 404 for an unknown id."""
    if not is_public_id(conversation_id):
        abort(404, description=f"no conversation with id {conversation_id[:64]!r}")
    outcome, conversation = cancel_start(conversation_id)
    if outcome == CancelStart.NOT_FOUND:
        abort(404, description=f"no conversation with id {conversation_id!r}")
    if outcome == CancelStart.TOO_LATE:
        return _too_late(f"the conversation is already {conversation.status}", conversation.status, conversation.id)
    return jsonify(conversation.to_dict())


def _too_late(why: str, status: str, row_id: str):
    """409: what the backend asked to cancel has left, or started, already."""
    response = jsonify(error=f"too late to cancel: {why}", status=status, id=row_id)
    response.status_code = 409
    return response
