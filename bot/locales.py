"""Which language a person's copy is in: one resolver for the WhatsApp templates, the email copy
and the flows' replies (docs/ARCHITECTURE.md, "Languages").

A user's `locale` (BCP 47, normalised with babel: `pt-BR`, `zh-Hant-TW`) chooses the copy, in
this order: the exact locale, then its language alone (`pt-PT` → `pt`), then DEFAULT_LOCALE
(then the default's own language). When none of them has copy the answer is None, and the caller
refuses (a 400 on /notify, a counted skip in a broadcast, a skipped reply): a message never goes
out in a language nobody chose for it.

Where each kind of copy lives:

- **Flow replies** (`Copy.FLOW`): `templates/<flow>/<name>.txt` is the DEFAULT_LOCALE's copy;
  `templates/<flow>/<locale>/<name>.txt` is another locale's (`templates/welcome/pt-BR/ask_consent.txt`).
- **Email** (`Copy.EMAIL`): `templates/email/<template>/{subject.txt, body.txt, body.html}` is the
  DEFAULT_LOCALE's; `templates/email/<template>/<locale>/` holds the same files in another locale.
- **WhatsApp templates** (`Copy.WHATSAPP`): TWILIO_CONTENT_SIDS maps a template name to either
  one ContentSid (the DEFAULT_LOCALE's) or an object of locale → ContentSid
  (`{"order_update": {"en": "HX…", "pt-BR": "HX…"}}`): each approved HX SID is one language.
  The SIDs belong to a Twilio account, so they are a setting, not files shipped with the code.

The copy under templates/ ships with the code, so which locales exist is read once per process
(`copy_index`); the WhatsApp map is read from the app's configuration on each call.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from babel import Locale, UnknownLocaleError

from bot import templates_dir

#: DEFAULT_LOCALE when the setting is absent: the language the shipped copy is written in.
FALLBACK_DEFAULT_LOCALE = "en"
#: The email copy's folder under templates/ (bot/channels/email/copy.py renders it).
EMAIL_DIR = "email"
#: What an email needs to exist in a locale; body.html is optional.
EMAIL_REQUIRED_PARTS = ("subject.txt", "body.txt")
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")


class Copy(StrEnum):
    """The three kinds of copy a locale chooses among."""

    WHATSAPP = "whatsapp"  # an approved template's ContentSid (TWILIO_CONTENT_SIDS)
    EMAIL = "email"  # templates/email/<template>/[<locale>/]
    FLOW = "flow"  # templates/<flow>/[<locale>/]<name>.txt


class NoCopyForLocale(LookupError):
    """No copy of `template` matches `locale`, its language or the default locale."""

    def __init__(self, kind: Copy, template: str, locale: str | None, available: Iterable[str]):
        self.kind, self.template, self.locale = kind, template, locale
        self.available = tuple(sorted(available))
        has = ", ".join(self.available) or "none"
        super().__init__(f"template {template!r} has no {kind} copy for locale {locale or '(none)'!r}, "
                         f"its language or the default locale (it has: {has}); nothing was sent")


# ---------------------------------------------------------------- locale tags


def normalise(value: str) -> str:
    """`value` as the stored BCP 47 form (`pt_br` → `pt-BR`); ValueError if babel does not know it.

    The same normalisation as a user's `locale` (bot/http/schemas.py), so a copy folder, a map key
    and a user's locale compare equal however each was spelled."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a locale is a non-empty string such as pt-BR")
    try:
        locale = Locale.parse(value.strip().replace("_", "-"), sep="-")
    except (UnknownLocaleError, ValueError, TypeError):
        raise ValueError(f"{value[:40]!r} is not a known BCP 47 locale, e.g. pt-BR or en") from None
    return "-".join(part for part in (locale.language, locale.script, locale.territory) if part)


def is_locale_tag(name: str) -> bool:
    """Whether a folder name is a locale written in its normalised form (`pt-BR`, not `pt_br`):
    only such folders hold translated copy, so a flow named like a word is never mistaken."""
    try:
        return normalise(name) == name
    except ValueError:
        return False


def language_of(locale: str) -> str:
    """The language subtag: `pt-BR` → `pt`, `zh-Hant-TW` → `zh`."""
    return locale.split("-", 1)[0]


def candidates(locale: str | None, default: str) -> tuple[str, ...]:
    """The locales to try, best first: exact, its language, the default, the default's language."""
    order = []
    if locale:
        order += [locale, language_of(locale)]
    order += [default, language_of(default)]
    return tuple(dict.fromkeys(order))


def resolve(locale: str | None, available: Iterable[str], default: str) -> str | None:
    """The first of `candidates(locale, default)` in `available`, or None when nothing matches."""
    have = set(available)
    return next((candidate for candidate in candidates(locale, default) if candidate in have), None)


def _app_config() -> Mapping[str, Any]:
    """The current app's configuration; outside an app (a pure test, a script), none."""
    from flask import current_app, has_app_context

    return current_app.config if has_app_context() else {}


def default_locale(config: Mapping[str, Any] | None = None) -> str:
    """DEFAULT_LOCALE from `config` (default: the current app's), else `FALLBACK_DEFAULT_LOCALE`."""
    if config is None:
        config = _app_config()
    return config.get("DEFAULT_LOCALE") or FALLBACK_DEFAULT_LOCALE


# ---------------------------------------------------------------- WhatsApp: TWILIO_CONTENT_SIDS


def whatsapp_sids(template: str, content_sids: Mapping[str, Any], default: str) -> dict[str, str]:
    """locale → ContentSid of one template in TWILIO_CONTENT_SIDS: a bare SID is the default
    locale's; an object maps its locales (normalised by the setting's validator)."""
    entry = content_sids.get(template)
    if isinstance(entry, str):
        return {default: entry}
    if isinstance(entry, Mapping):
        return {str(locale): str(sid) for locale, sid in entry.items()}
    return {}


def whatsapp_template_names(content_sids: Mapping[str, Any]) -> frozenset[str]:
    """Every template name configured in TWILIO_CONTENT_SIDS, in whatever locales."""
    return frozenset(name for name, entry in content_sids.items() if entry)


# ---------------------------------------------------------------- templates/: what exists where


@dataclass(frozen=True)
class CopyIndex:
    """Which locales each template's copy exists in, read from the templates folder once.

    The default locale's copy (files outside a locale folder) is listed under `DEFAULT`, since
    which locale that is comes from the app's settings."""

    DEFAULT = ""
    email: Mapping[str, frozenset[str]]
    flow: Mapping[str, frozenset[str]]

    def locales(self, kind: Copy, template: str, default: str) -> frozenset[str]:
        """The locales `template` has copy in, the default copy named as `default`."""
        table = self.email if kind == Copy.EMAIL else self.flow
        found = table.get(template, frozenset())
        return frozenset(default if locale == self.DEFAULT else locale for locale in found)

    def has_folder(self, kind: Copy, template: str, locale: str) -> bool:
        """Whether `locale` has its own folder for `template` (else its copy is the default one)."""
        table = self.email if kind == Copy.EMAIL else self.flow
        return locale in table.get(template, ())


def _has_email_parts(folder: Path) -> bool:
    return all((folder / part).is_file() for part in EMAIL_REQUIRED_PARTS)


@lru_cache(maxsize=4)
def _read_index(root: str) -> CopyIndex:
    base = Path(root)
    email: dict[str, set[str]] = {}
    email_root = base / EMAIL_DIR
    if email_root.is_dir():
        for folder in email_root.iterdir():
            if not folder.is_dir() or not _TEMPLATE_NAME.fullmatch(folder.name):
                continue
            found = {CopyIndex.DEFAULT} if _has_email_parts(folder) else set()
            found |= {sub.name for sub in folder.iterdir()
                      if sub.is_dir() and is_locale_tag(sub.name) and _has_email_parts(sub)}
            if found:
                email[folder.name] = found
    flow: dict[str, set[str]] = {}
    if base.is_dir():
        for path in base.rglob("*.txt"):
            parts = path.relative_to(base).parts
            if parts[0] == EMAIL_DIR or len(parts) < 2:
                continue
            if len(parts) >= 3 and is_locale_tag(parts[-2]):
                name, locale = "/".join((*parts[:-2], path.stem)), parts[-2]
            else:
                name, locale = "/".join((*parts[:-1], path.stem)), CopyIndex.DEFAULT
            flow.setdefault(name, set()).add(locale)
    return CopyIndex(email={k: frozenset(v) for k, v in email.items()},
                     flow={k: frozenset(v) for k, v in flow.items()})


def copy_index(root: Path | None = None) -> CopyIndex:
    """The index of templates/ (or `root`), read once per process and folder: the copy ships
    with the code, and a directory walk per message would cost more than the message."""
    return _read_index(str(root or templates_dir.TEMPLATES_DIR))


# ---------------------------------------------------------------- the question every sender asks


def available_locales(kind: Copy, template: str, *, config: Mapping[str, Any] | None = None,
                      root: Path | None = None) -> frozenset[str]:
    """Every locale `template` has copy in, for this kind of copy (the default copy as
    DEFAULT_LOCALE). Empty for a template that does not exist at all."""
    if config is None:
        config = _app_config()
    default = default_locale(config)
    if kind == Copy.WHATSAPP:
        return frozenset(whatsapp_sids(template, config.get("TWILIO_CONTENT_SIDS") or {}, default))
    if not isinstance(template, str) or not _TEMPLATE_NAME.fullmatch(template):
        return frozenset()  # a name from a request never climbs out of templates/
    return copy_index(root).locales(kind, template, default)


def template_locale(kind: Copy, template: str, locale: str | None, *, config: Mapping[str, Any] | None = None,
                    root: Path | None = None) -> str | None:
    """Which locale of `template` to use for a person whose locale is `locale` (None: unknown,
    as for a WhatsApp user who wrote first): exact, its language, then DEFAULT_LOCALE. None
    when no copy matches: the caller refuses rather than send another language.

    `kind` is `Copy.WHATSAPP` (TWILIO_CONTENT_SIDS), `Copy.EMAIL` (templates/email/<template>/)
    or `Copy.FLOW` (a reply's templates/<flow>/<name>). `config` defaults to the current app's."""
    if config is None:
        config = _app_config()
    available = available_locales(kind, template, config=config, root=root)
    return resolve(locale, available, default_locale(config))


def require_locale(kind: Copy, template: str, locale: str | None, **options: Any) -> str:
    """`template_locale`, or NoCopyForLocale (a LookupError) naming the template and the locale."""
    chosen = template_locale(kind, template, locale, **options)
    if chosen is None:
        raise NoCopyForLocale(kind, template, locale,
                              available_locales(kind, template, config=options.get("config"), root=options.get("root")))
    return chosen


def content_sid(template: str, locale: str | None, *, config: Mapping[str, Any] | None = None) -> str | None:
    """The approved ContentSid of WhatsApp template `template` for `locale` (resolved as
    `template_locale`), or None when the template has none in a matching language."""
    if config is None:
        config = _app_config()
    default = default_locale(config)
    sids = whatsapp_sids(template, config.get("TWILIO_CONTENT_SIDS") or {}, default)
    chosen = resolve(locale, sids, default)
    return sids[chosen] if chosen is not None else None


def flow_copy_path(template: str, locale: str | None, *, config: Mapping[str, Any] | None = None,
                   root: Path | None = None) -> str:
    """The Jinja2 name of a flow reply's copy in `locale` (resolved), relative to templates/:
    `welcome/pt-BR/ask_consent.txt`, or the default copy `welcome/ask_consent.txt` (also for a
    template the index does not know, so a missing one fails as TemplateNotFound)."""
    chosen = template_locale(Copy.FLOW, template, locale, config=config, root=root)
    if chosen is not None and copy_index(root).has_folder(Copy.FLOW, template, chosen):
        folder, _, name = template.rpartition("/")
        return f"{folder}/{chosen}/{name}.txt"
    return f"{template}.txt"


def email_copy_folder(template: str, chosen: str, *, root: Path | None = None) -> str:
    """The folder (relative to templates/) of `template`'s email copy in `chosen`, a locale
    `template_locale(Copy.EMAIL, ...)` returned: its own folder, or the default copy's."""
    if copy_index(root).has_folder(Copy.EMAIL, template, chosen):
        return f"{EMAIL_DIR}/{template}/{chosen}"
    return f"{EMAIL_DIR}/{template}"
