"""bot/locales.py: exact locale -> its language -> DEFAULT_LOCALE, None when nothing matches,
for the WhatsApp map, the email copy and the flows' copy (pure: no app, a temporary copy folder)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bot import locales
from bot.locales import Copy, NoCopyForLocale

SID = {name: "HX" + digit * 32 for name, digit in (("en", "1"), ("pt-BR", "2"), ("pt", "3"), ("es", "4"))}


@pytest.mark.parametrize("locale, default, expected", [
    ("pt-BR", "en", ("pt-BR", "pt", "en")),
    ("pt", "en", ("pt", "en")),
    (None, "en-US", ("en-US", "en")),
    ("en-GB", "en-US", ("en-GB", "en", "en-US")),
    ("zh-Hant-TW", "en", ("zh-Hant-TW", "zh", "en")),
])
def test_candidates_exact_then_language_then_default(locale, default, expected):
    assert locales.candidates(locale, default) == expected


@pytest.mark.parametrize("locale, available, expected", [
    ("pt-BR", {"en", "pt-BR", "pt"}, "pt-BR"),  # exact
    ("pt-PT", {"en", "pt-BR", "pt"}, "pt"),  # its language
    ("pt-PT", {"en", "pt-BR"}, "en"),  # the default (a sibling territory is not the language)
    ("fr", {"en", "es"}, "en"),
    (None, {"en", "es"}, "en"),  # no locale known: the default
    ("fr", {"pt-BR", "es"}, None),  # nothing matches: refuse, never another language
    (None, set(), None),
])
def test_resolve(locale, available, expected):
    assert locales.resolve(locale, available, "en") == expected


@pytest.mark.parametrize("raw, expected", [("pt_br", "pt-BR"), ("PT-br", "pt-BR"), ("en", "en"),
                                           ("zh-hant-tw", "zh-Hant-TW")])
def test_normalise_is_the_users_normalisation(raw, expected):
    assert locales.normalise(raw) == expected


@pytest.mark.parametrize("raw", ["", "  ", "xx-nope-nope", "english", 7])
def test_normalise_refuses_what_babel_does_not_know(raw):
    with pytest.raises(ValueError):
        locales.normalise(raw)


def test_whatsapp_map_a_bare_sid_is_the_default_locales():
    config = {"DEFAULT_LOCALE": "en", "TWILIO_CONTENT_SIDS": {
        "plain": SID["en"], "order_update": {"en": SID["en"], "pt-BR": SID["pt-BR"], "pt": SID["pt"]},
        "promo": {"pt-BR": SID["pt-BR"]}}}
    assert locales.content_sid("plain", "pt-BR", config=config) == SID["en"]
    assert locales.content_sid("order_update", "pt-BR", config=config) == SID["pt-BR"]
    assert locales.content_sid("order_update", "pt-PT", config=config) == SID["pt"]
    assert locales.content_sid("order_update", "fr", config=config) == SID["en"]
    assert locales.content_sid("order_update", None, config=config) == SID["en"]
    assert locales.content_sid("promo", "pt-BR", config=config) == SID["pt-BR"]
    assert locales.content_sid("promo", "en", config=config) is None
    assert locales.content_sid("nope", "en", config=config) is None
    assert locales.template_locale(Copy.WHATSAPP, "order_update", "pt-PT", config=config) == "pt"
    with pytest.raises(NoCopyForLocale, match=r"'promo'.*'en'.*pt-BR"):
        locales.require_locale(Copy.WHATSAPP, "promo", "en", config=config)


def _write(root: Path, relative: str, text: str = "x") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def copy_root(tmp_path: Path) -> Path:
    _write(tmp_path, "welcome/ask.txt")
    _write(tmp_path, "welcome/pt-BR/ask.txt")
    _write(tmp_path, "welcome/es/ask.txt")
    _write(tmp_path, "welcome/pt-BR/only_pt.txt")
    _write(tmp_path, "welcome/notalocale/ask.txt")  # not a locale folder: a template of its own
    for part in ("subject.txt", "body.txt"):
        _write(tmp_path, f"email/login/{part}")
        _write(tmp_path, f"email/login/pt-BR/{part}")
        _write(tmp_path, f"email/promo/es/{part}")
    _write(tmp_path, "email/login/fr/subject.txt")  # no body: no French copy
    return tmp_path


def test_flow_copy_layout(copy_root):
    config = {"DEFAULT_LOCALE": "en"}
    index = locales.copy_index(copy_root)
    assert index.locales(Copy.FLOW, "welcome/ask", "en") == {"en", "pt-BR", "es"}
    assert index.locales(Copy.FLOW, "welcome/notalocale/ask", "en") == {"en"}
    path = lambda template, locale: locales.flow_copy_path(template, locale, config=config, root=copy_root)  # noqa: E731
    assert path("welcome/ask", "pt-BR") == "welcome/pt-BR/ask.txt"
    assert path("welcome/ask", "es-MX") == "welcome/es/ask.txt"
    assert path("welcome/ask", "pt-PT") == "welcome/ask.txt"  # no pt: the default copy
    assert path("welcome/ask", None) == "welcome/ask.txt"
    assert path("welcome/only_pt", "pt-BR") == "welcome/pt-BR/only_pt.txt"
    assert locales.template_locale(Copy.FLOW, "welcome/only_pt", "en", config=config, root=copy_root) is None
    assert path("welcome/missing", "pt-BR") == "welcome/missing.txt"  # unknown: fails as TemplateNotFound


def test_email_copy_layout(copy_root):
    config = {"DEFAULT_LOCALE": "en"}
    locale = lambda template, wanted: locales.template_locale(  # noqa: E731
        Copy.EMAIL, template, wanted, config=config, root=copy_root)
    assert locale("login", "pt-BR") == "pt-BR"
    assert locales.email_copy_folder("login", "pt-BR", root=copy_root) == "email/login/pt-BR"
    assert locale("login", "fr") == "en"  # a French folder without a body is no French copy
    assert locales.email_copy_folder("login", "en", root=copy_root) == "email/login"
    assert locale("promo", "es-AR") == "es"
    assert locale("promo", "en") is None
    assert locale("../email/login", "en") is None and locale("login/pt-BR", "pt-BR") is None


def test_the_default_copy_takes_the_default_locales_name(copy_root):
    """With DEFAULT_LOCALE=es the copy outside locale folders is Spanish's: an es folder, when
    there is one, is the same locale and wins."""
    config = {"DEFAULT_LOCALE": "es"}
    assert locales.flow_copy_path("welcome/ask", "fr", config=config, root=copy_root) == "welcome/es/ask.txt"
    assert locales.template_locale(Copy.EMAIL, "login", "fr", config=config, root=copy_root) == "es"
    assert locales.email_copy_folder("login", "es", root=copy_root) == "email/login"


def test_the_shipped_copy_has_portuguese_for_a_flow_and_the_emails():
    index = locales.copy_index()
    assert "pt-BR" in index.locales(Copy.FLOW, "appointment/reminder", "en")
    for template in ("login", "order_update"):
        assert {"en", "pt-BR"} <= index.locales(Copy.EMAIL, template, "en")


def _variables(path: Path) -> set[str]:
    from jinja2 import Environment, meta

    return meta.find_undeclared_variables(Environment().parse(path.read_text()))


def test_every_translation_has_a_default_and_asks_for_nothing_more():
    """A translated file stands beside a default one (the fallback always exists) and uses only
    variables the default uses: the flows and /notify give what the default copy needs."""
    from bot.templates_dir import TEMPLATES_DIR

    translations = [path for path in TEMPLATES_DIR.rglob("*") if path.is_file() and locales.is_locale_tag(path.parent.name)]
    assert translations
    for path in translations:
        default = path.parent.parent / path.name
        assert default.is_file(), f"{path.relative_to(TEMPLATES_DIR)} has no default copy {default.name}"
        extra = _variables(path) - _variables(default)
        assert not extra, f"{path.relative_to(TEMPLATES_DIR)} uses {sorted(extra)}, which its default copy does not"
