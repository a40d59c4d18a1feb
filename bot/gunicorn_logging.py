"""gunicorn's access log without full phone numbers (the Procfile's `--logger-class`).

The request line and URL atoms hold paths such as /contacts/+15551234567/consent; everything
else of gunicorn's logger is kept as it is.
"""
from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from bot.logmask import mask_phone


class MaskingLogger(Logger):
    """gunicorn's Logger, with phone numbers masked in the request line, path and query."""

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "q"):
            if isinstance(atoms.get(key), str):
                atoms[key] = mask_phone(atoms[key])
        return atoms
