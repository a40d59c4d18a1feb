"""Email copy: Jinja2 templates under templates/email/<template>/ (subject, text, HTML).

Each email template is a folder of three files: `subject.txt`, `body.txt` and `body.html`
(optional: without it the email is text only). HTML is rendered with autoescaping ON, so a
variable holding `<script>` or `&` arrives as text; subject and text are rendered without (they
are plain text; an escaped `&amp;` there would be a visible bug). Undefined variables are errors,
as in the WhatsApp copy (bot/conversations/replies.py), so a typo fails a test, not a user.

The folder is the WhatsApp copy's (bot/templates_dir.py: the installed package's bot/templates
first, then the checkout's templates/, then the working directory's).

Per locale (bot/locales.py): the files in templates/email/<template>/ are the DEFAULT_LOCALE's
copy; templates/email/<template>/<locale>/ holds the same three files in another locale
(`login/pt-BR/`). The user's locale picks one: exact, its language, the default; none matching
is `NoCopyForLocale`, a LookupError, and nothing is sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateNotFound, select_autoescape

from bot import locales
from bot.locales import EMAIL_DIR, Copy
from bot.templates_dir import TEMPLATES_DIR

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


def has_email_copy(template: str, locale: str | None = None) -> bool:
    """Whether templates/email/<template>/ has the subject and text an email needs: in any
    locale, or (with `locale`) in one the user's locale resolves to."""
    found = locales.available_locales(Copy.EMAIL, template, config={}, root=TEMPLATES_DIR)
    if locale is None:
        return bool(found)
    return locales.template_locale(Copy.EMAIL, template, locale, root=TEMPLATES_DIR) is not None


@lru_cache(maxsize=1)
def email_templates() -> frozenset[str]:
    """Every template name with email copy in some locale (what `has_email_copy` accepts). Read
    once per process: the copy ships with the code (a directory listing on every /notify cost 5%
    of its CPU)."""
    return frozenset(locales.copy_index(TEMPLATES_DIR).email)


def render_email(template: str, variables: dict[str, Any], *, business: str = "us", locale: str | None = None,
                 config: Any = None) -> EmailCopy:
    """Render templates/email/<template>/ with `variables`, in `locale` (resolved by
    bot/locales.py; None: the default locale's copy). `config` gives DEFAULT_LOCALE (default:
    the current app's).

    The context is `variables` by name, `variables` itself (for keys that are not names, such as
    a WhatsApp template's "1", "2": `variables["1"]`) and `business` (how the sender names itself,
    BOT_NAME). Raises LookupError when the template has no email copy (`NoCopyForLocale` when it
    has some, but in no language the locale resolves to), and jinja2's UndefinedError when the
    copy uses a variable that was not given.
    """
    if not has_email_copy(template):
        raise LookupError(f"no email copy named {template!r}")
    chosen = locales.require_locale(Copy.EMAIL, template, locale, config=config, root=TEMPLATES_DIR)
    env = environment()
    context = {"business": business, **{k: v for k, v in variables.items() if isinstance(k, str)},
               "variables": variables}
    base = locales.email_copy_folder(template, chosen, root=TEMPLATES_DIR)
    subject = " ".join(env.get_template(f"{base}/subject.txt").render(context).split())
    text = env.get_template(f"{base}/body.txt").render(context).strip() + "\n"
    try:
        html_template = env.get_template(f"{base}/body.html")
    except TemplateNotFound:
        html = None
    else:
        html = html_template.render(context).strip() + "\n"
    return EmailCopy(subject, text, html)
