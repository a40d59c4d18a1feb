"""Where the message copy lives: one lookup for the WhatsApp copy (bot/conversations/replies.py)
and the email copy (bot/channels/email/copy.py), below both packages."""
from __future__ import annotations

from pathlib import Path


def _find_templates() -> Path:
    """The message copy, the first folder of these that exists:

    1. bot/templates inside the installed package: a built wheel (`pip install .`) carries the
       top-level templates/ there (pyproject's package-dir), so it runs from any directory;
    2. templates/ beside the bot package: a checkout, or `pip install -e .`;
    3. templates/ in the working directory.

    The installed package comes first so that a stray top-level `templates` folder in
    site-packages (beside an installed bot) is never taken for ours."""
    from importlib import resources

    installed = resources.files("bot") / "templates"
    candidates = [installed] if isinstance(installed, Path) else []  # not when imported from a zip
    candidates += [Path(__file__).resolve().parents[1] / "templates", Path.cwd() / "templates"]
    return next((path for path in candidates if path.is_dir()), candidates[-1])


TEMPLATES_DIR = _find_templates()
