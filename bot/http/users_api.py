"""Users by the backend's own id: PUT /users/<user_id> stores one, GET /users/<user_id> reads it."""
from __future__ import annotations

from flask import Blueprint, abort, jsonify

from bot.conversations.users import UserConflict, find_user, upsert_user, user_dict
from bot.extensions import db
from bot.http.auth import require_api_token
from bot.http.notify import read_json_body
from bot.http.schemas import InvalidRequest, UserBody, check_user_id, validate

bp = Blueprint("users_api", __name__)


def user_id_or_400(user_id: str) -> str:
    """The path's user id, or a 400 saying what is wrong with it."""
    try:
        return check_user_id(user_id)
    except InvalidRequest as exc:
        abort(400, description=str(exc))


@bp.put("/users/<user_id>")
@require_api_token
def put_user(user_id: str):
    """Create or update a user: an omitted field is kept, null clears it. 201 when created."""
    user_id = user_id_or_400(user_id)
    try:
        body = validate(UserBody, read_json_body())
    except InvalidRequest as exc:
        abort(400, description=str(exc))
    try:
        user, created = upsert_user(user_id, body.changes())
        db.session.commit()
    except UserConflict as exc:
        db.session.rollback()
        abort(409, description=str(exc))
    response = jsonify(user_dict(user))
    response.status_code = 201 if created else 200
    return response


@bp.get("/users/<user_id>")
@require_api_token
def get_user(user_id: str):
    """A user's fields and consent per channel; 404 if unknown."""
    user = find_user(user_id_or_400(user_id))
    if user is None:
        abort(404, description="no such user")
    return jsonify(user_dict(user))
