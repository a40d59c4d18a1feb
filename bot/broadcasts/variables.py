"""A broadcast's `variables` per recipient: a value "$user.<field>" is that recipient's own field.

Defined here, below both the request's validation (bot/http/broadcast_schema.py) and the worker's
expansion (bot/broadcasts/audience.py): docs/api.md, "Broadcasts".
"""
from __future__ import annotations

from typing import Any, Mapping

#: A variable whose value is exactly "$user.<field>" takes each recipient's own field;
#: "$$" at the start stands for a literal "$".
USER_REFERENCE = "$user."
USER_FIELDS = ("name", "user_id", "locale", "timezone")


def resolve_variables(variables: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, str] | None:
    """The template's variables for one recipient: each "$user.<field>" replaced by `user`'s field;
    None when a referenced field is empty (the recipient is skipped `missing_user_field`)."""
    resolved: dict[str, str] = {}
    for key, value in variables.items():
        if isinstance(value, str) and value.startswith(USER_REFERENCE):
            own = user.get(value[len(USER_REFERENCE):])
            if own is None or not str(own).strip():
                return None
            resolved[key] = str(own)
        elif isinstance(value, str) and value.startswith("$$"):
            resolved[key] = value[1:]
        else:
            resolved[key] = str(value)
    return resolved


def has_user_references(variables: Mapping[str, Any] | None) -> bool:
    """Whether any variable takes a recipient's own field (then each recipient keeps its own)."""
    return any(isinstance(value, str) and value.startswith(USER_REFERENCE) for value in (variables or {}).values())
