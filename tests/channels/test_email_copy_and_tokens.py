"""Email copy (Jinja2: subject and text plain, HTML autoescaped) and one-click unsubscribe tokens."""
from __future__ import annotations

import pytest
from jinja2 import UndefinedError

from bot.channels.email.copy import TEMPLATES_DIR, EmailCopy, has_email_copy, render_email
from bot.channels.email.unsubscribe import make_token, read_token

SECRET = "test-secret-key"
HOSTILE = '<script>alert("x")</script> & Co'


# ------------------------------------------------------------------ copy


def test_login_copy_escapes_html_and_leaves_text_alone():
    copy = render_email("login", {"name": HOSTILE, "device": "Firefox on Linux", "time": "10:42 UTC"})

    assert copy.subject == "New sign-in to your account"
    assert f"Hi {HOSTILE}," in copy.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Co" in copy.html
    assert "<script>" not in copy.html
    assert "Firefox on Linux" in copy.text and "10:42 UTC" in copy.html


def test_login_copy_needs_no_variables():
    copy = render_email("login", {})
    assert copy.text.startswith("Hi,\n") and " from " not in copy.text and "None" not in copy.text
    assert copy.html is not None and "None" not in copy.html


def test_order_update_reads_the_whatsapp_templates_positional_variables():
    copy = render_email("order_update", {"1": "Ada", "2": 42}, business="Acme")
    assert copy == EmailCopy(subject="Your order 42 has an update", text=copy.text, html=copy.html)
    assert copy.text.startswith("Hi Ada,") and "with Acme" in copy.text
    assert "<strong>42</strong>" in copy.html


def test_a_subject_is_one_line_even_when_a_variable_is_not():
    copy = render_email("order_update", {"1": "Ada", "2": "A-1\r\nBcc: x@example.com"})
    assert "\n" not in copy.subject and "\r" not in copy.subject


def test_user_text_is_never_evaluated_as_a_template():
    copy = render_email("login", {"name": "{{ 7*7 }}"})
    assert "{{ 7*7 }}" in copy.text and "49" not in copy.text


@pytest.mark.parametrize("name, expected", [
    ("login", True), ("order_update", True), ("welcome", False), ("nope", False),
    ("../email/login", False), ("login/../../common", False), ("", False), ("a b", False), ("/login", False),
    ("login/", False), ("order-update", False), (None, False),
])
def test_has_email_copy(name, expected):
    assert has_email_copy(name) is expected


def test_a_template_without_email_copy_is_a_lookup_error():
    with pytest.raises(LookupError):
        render_email("welcome", {})


def test_a_typo_in_copy_is_an_error_not_a_blank(tmp_path, monkeypatch):
    import bot.channels.email.copy as copy_module

    folder = tmp_path / "email" / "typo"
    folder.mkdir(parents=True)
    (folder / "subject.txt").write_text("Hi")
    (folder / "body.txt").write_text("Hello {{ nmae }}")
    monkeypatch.setattr(copy_module, "TEMPLATES_DIR", tmp_path)
    copy_module.environment.cache_clear()
    try:
        with pytest.raises(UndefinedError):
            render_email("typo", {"name": "Ada"})
        assert render_email("typo", {"nmae": "Ada"}).html is None  # no body.html: text only
    finally:
        monkeypatch.undo()
        copy_module.environment.cache_clear()


def test_every_email_template_has_subject_and_text():
    folders = [p for p in (TEMPLATES_DIR / "email").iterdir() if p.is_dir()]
    assert {p.name for p in folders} >= {"login", "order_update"}
    for folder in folders:
        assert has_email_copy(folder.name), folder


# ------------------------------------------------------------------ unsubscribe tokens


def test_a_token_reads_back_its_contact_and_matches_its_address_only():
    token = make_token(42, "Ada@Example.com", secret_key=SECRET)

    read = read_token(token, secret_key=SECRET)

    assert read is not None and read.contact_id == 42
    assert read.matches("ada@example.com", SECRET) and read.matches(" ADA@example.com ", SECRET)
    assert not read.matches("other@example.com", SECRET) and not read.matches(None, SECRET)
    assert read_token(token, secret_key=SECRET) == read  # works more than once


def test_a_token_carries_no_readable_address():
    import base64

    token = make_token(42, "ada@example.com", secret_key=SECRET)
    payload = token.split(".")[0]
    decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert b"ada" not in decoded and "ada" not in token


def test_a_token_signed_with_another_key_is_refused():
    assert read_token(make_token(42, "ada@example.com", secret_key="another key"), secret_key=SECRET) is None


@pytest.mark.parametrize("alter", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # signature changed
    lambda t: "WzQzLCJ4Il0" + t[t.index("."):],  # payload swapped for [43, "x"]
    lambda t: t.split(".")[0],  # signature removed
    lambda t: "",
    lambda t: "x" * 600,
    lambda t: "not a token at all",
])
def test_an_altered_or_forged_token_is_refused(alter):
    assert read_token(alter(make_token(42, "ada@example.com", secret_key=SECRET)), secret_key=SECRET) is None


def test_a_validly_signed_payload_of_the_wrong_shape_is_refused():
    from itsdangerous import URLSafeSerializer

    from bot.channels.email.unsubscribe import SALT

    for payload in ({"id": 1}, [True, "x"], [1], [1, 2], [None, "x"]):
        assert read_token(URLSafeSerializer(SECRET, salt=SALT).dumps(payload), secret_key=SECRET) is None


def test_a_token_needs_a_secret():
    with pytest.raises(ValueError):
        make_token(1, "ada@example.com", secret_key="")


def test_the_templates_notify_accepts_are_the_ones_with_email_copy() -> None:
    from bot.channels.email.copy import email_templates

    assert {"login", "order_update"} <= email_templates()
    assert all(has_email_copy(name) for name in email_templates())
