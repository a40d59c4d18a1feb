"""Email copy: Jinja2 templates under templates/email/<template>/ (subject, text, HTML).

Each email template is a folder of three files: `subject.txt`, `body.txt` and `body.html`
(optional: without it the email is text only). HTML is rendered with autoescaping ON, so a
variable holding `<script>` or `&` arrives as text; subject and text are rendered without (they
are plain text; an escaped `&amp;` there would be a visible bug). Undefined variables are errors,
as in the WhatsApp copy (bot/conversations/replies.py), so a typo fails a test, not a user.

The folder is the WhatsApp copy's (bot/templates_dir.py: the installed package's bot/templates
first, then the checkout's templates/, then the working directory's).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateNotFound, select_autoescape

from bot.templates_dir import TEMPLATES_DIR

#: templates/<EMAIL_DIR>/<template>/: beside the WhatsApp copy, in its own namespace.
EMAIL_DIR = "email"
PARTS = ("subject.txt", "body.txt", "body.html")


@dataclass(frozen=True)
class EmailCopy:
    """One rendered email: a one-line subject, the text body, the HTML body (None: text only)."""

    subject: str
    text: str
    html: str | None




@lru_cache(maxsize=1)
def environment() -> Environment:
    """The Jinja2 environment for email copy: autoescaping for .html only."""
    return Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), undefined=StrictUndefined,
                       autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False,
                                                    default=False),
                       keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True)


_NAME = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")


def _valid_name(template: str) -> bool:
    # A template name comes from a request: never let it climb out of templates/email/.
    return isinstance(template, str) and _NAME.fullmatch(template) is not None


def has_email_copy(template: str) -> bool:
    """Whether templates/email/<template>/ has the subject and text an email needs."""
    if not _valid_name(template):
        return False
    folder = TEMPLATES_DIR / EMAIL_DIR / template
    return (folder / "subject.txt").is_file() and (folder / "body.txt").is_file()


@lru_cache(maxsize=1)
def email_templates() -> frozenset[str]:
    """Every template name with email copy (what `has_email_copy` accepts). Read once per process:
    the copy ships with the code (a directory listing on every /notify cost 5% of its CPU)."""
    folder = TEMPLATES_DIR / EMAIL_DIR
    names = (path.name for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else ()
    return frozenset(name for name in names if has_email_copy(name))


def render_email(template: str, variables: dict[str, Any], *, business: str = "us") -> EmailCopy:
    """Render templates/email/<template>/ with `variables`.

    The context is `variables` by name, `variables` itself (for keys that are not names, such as
    a WhatsApp template's "1", "2": `variables["1"]`) and `business` (how the sender names itself,
    BOT_NAME). Raises LookupError when the template has no email copy, and jinja2's
    UndefinedError when the copy uses a variable that was not given.
    """
    if not has_email_copy(template):
        raise LookupError(f"no email copy named {template!r}")
    env = environment()
    context = {"business": business, **{k: v for k, v in variables.items() if isinstance(k, str)},
               "variables": variables}
    base = f"{EMAIL_DIR}/{template}"
    subject = " ".join(env.get_template(f"{base}/subject.txt").render(context).split())
    text = env.get_template(f"{base}/body.txt").render(context).strip() + "\n"
    try:
        html_template = env.get_template(f"{base}/body.html")
    except TemplateNotFound:
        html = None
    else:
        html = html_template.render(context).strip() + "\n"
    return EmailCopy(subject, text, html)
