"""Every repository path the Markdown names exists (README.md, docs/*.md, bench/*.md).

Docs rot quietly when code moves: a page pointing at `bot/delivery/sender.py` after it was split,
or at `docs/x.md` after a rename, sends a newcomer nowhere. What counts as a path:

- a link target, `[text](docs/configuration.md#anchor)`: resolved from the Markdown file's own
  folder, as a renderer does (anchors and queries dropped; URLs and `#anchors` skipped);
- a word of an inline code span (`` `bot/channels/email/mail.py` ``, `` `bench/throughput.py --rates 80` ``)
  whose first folder is one of the repository's own top-level entries (`bot/`, `docs/`,
  `tests/`...), so `text/plain`, `America/Sao_Paulo`, `/notify` and `instance/...` (made at run
  time, ignored by git) are not paths; resolved from the repository root, else the file's folder;
- a bare file name in a code span ending in a known extension (`wsgi.py`, `THROUGHPUT.md`): some
  file of the repository must have that name (not an extension alone, `.txt`, nor a standard
  library module, `threading.py` in a profile's frames).

The README's layout map (the fenced block under "## Layout") is a tree: the first word of each
of its lines names a file or folder (`bot/`, then `  http/`, then `    notify.py`), each must
exist. Placeholders are not paths (`<id>`, `…`, `{name}`, `$VAR`); a glob (`bot/channels/email/*`) must
match something; `path.py::test_name` and `path.py:123` name the file. Fenced code blocks are
skipped: they hold commands and output, not references. The failure lists every missing path
with the file and line that names it.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Extensions a bare file name must carry to be taken for a path.
KNOWN_EXTENSIONS = (".py", ".md", ".txt", ".html", ".toml", ".json", ".svg", ".ini", ".mako", ".cfg", ".yml",
                    ".yaml", ".sh")
#: Top-level entries that exist only at run time or in a developer's checkout, never in the repository.
NOT_IN_REPOSITORY = {".git", ".venv", ".ci-venv", "instance", "build", "dist", "__pycache__", ".pytest_cache",
                     ".hypothesis", ".env"}
PLACEHOLDER = re.compile(r"[<>{}$…]|\.\.\.")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*.md")])


def top_level_entries() -> set[str]:
    return {entry.name for entry in ROOT.iterdir()} - NOT_IN_REPOSITORY - {
        entry.name for entry in ROOT.iterdir() if entry.name.endswith(".egg-info")}


def repository_file_names() -> set[str]:
    names = set()
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if not parts & NOT_IN_REPOSITORY and not any(p.endswith(".egg-info") for p in parts):
            names.add(path.name)
    return names


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def _clean(token: str) -> str:
    token = token.strip().strip("\"'").rstrip(",.;:!?)").lstrip("(")
    token = re.sub(r"::.*$", "", token)  # tests/test_x.py::test_name
    token = re.sub(r":\d+(-\d+)?$", "", token)  # bot/x.py:12
    return token.split("#", 1)[0]


def _exists(candidate: str, *bases: Path) -> bool:
    for base in bases:
        target = base / candidate
        if "*" in candidate or "?" in candidate:
            if any(base.glob(candidate)):
                return True
        elif target.exists():
            return True
    return False


def named_paths(path: Path, top: set[str], names: set[str]) -> list[tuple[int, str, bool]]:
    """(line, path, exists) for every repository path `path` names."""
    found: list[tuple[int, str, bool]] = []
    here = path.parent
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor on the same page
            target = target.split("#", 1)[0].split("?", 1)[0]
            if target and not PLACEHOLDER.search(target):
                found.append((number, target, _exists(target, here)))
        for _, span in CODE_SPAN.findall(line):
            for word in span.split():
                token = _clean(word)
                if not token or "://" in token or PLACEHOLDER.search(token) or token.startswith(("-", "/")):
                    continue
                if "/" in token:
                    if token.split("/", 1)[0] not in top:
                        continue
                    found.append((number, token, _exists(token.rstrip("/"), ROOT, here)))
                elif (token.endswith(KNOWN_EXTENSIONS) and re.fullmatch(r"\w[\w.-]*", token)
                      and token.split(".", 1)[0] not in sys.stdlib_module_names):  # `threading.py` in a profile
                    found.append((number, token, token in names))
    return found


def layout_map_paths(readme: Path) -> list[tuple[int, str]]:
    """(line, path) of each entry of the layout map: the first word of a line of the fenced block
    under "## Layout", placed in the tree by its indentation. Continuation lines (a description
    that goes on) start with a word that is neither a folder (`name/`) nor a file (`name.ext`)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "## Layout")
    except StopIteration:
        return []
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    found: list[tuple[int, str]] = []
    parents: list[tuple[int, str]] = []  # (indent, folder)
    for number in range(fence + 1, len(lines)):
        line = lines[number]
        if line.startswith("```"):
            break
        if not line.strip():
            continue
        indent, word = len(line) - len(line.lstrip()), line.split()[0]
        if not (word.endswith("/") or re.fullmatch(r"[\w.-]+\.\w+", word) or word in {"Procfile"}):
            continue  # a description going on
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = "".join(folder for _, folder in parents) + word
        found.append((number + 1, path))
        if word.endswith("/"):
            parents.append((indent, word))
    return found


def test_the_readme_layout_map_names_only_what_exists() -> None:
    missing = [f"README.md:{number}: {path}" for number, path in layout_map_paths(ROOT / "README.md")
               if not (ROOT / path.rstrip("/")).exists()]
    assert layout_map_paths(ROOT / "README.md"), "the README has no layout map (a fenced block under ## Layout)"
    assert not missing, (f"{len(missing)} entr(y/ies) of the README's layout map do not exist (moved or renamed?):\n  "
                         + "\n  ".join(missing))


def test_every_repository_path_named_in_the_markdown_exists() -> None:
    top, names = top_level_entries(), repository_file_names()
    missing = []
    for path in markdown_files():
        for number, named, exists in named_paths(path, top, names):
            if not exists:
                missing.append(f"{path.relative_to(ROOT)}:{number}: {named}")
    assert not missing, (f"{len(missing)} path(s) named in the Markdown do not exist (moved or renamed? fix the "
                         "page, or the reference):\n  " + "\n  ".join(missing))


def test_the_checker_sees_links_code_spans_and_bare_names_and_skips_the_rest(tmp_path: Path) -> None:
    """The rules above, on a page written for them: what must be found, and what must not."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "See [the config](docs/configuration.md#table) and [a gone page](docs/gone.md), "
        "[a site](https://example.com/x.md), [here](#anchor).",
        "Code: `bot/devmode.py`, `bench/throughput.py --rates 80`, `tests/test_docs_paths.py::test_x`, "
        "`bot/nowhere.py:12`, `wsgi.py`, `missing_module.py`, `bot/channels/email/*`.",
        "Frames and extensions: `wait (threading.py:320)`, the `.txt` parts.",
        "Not paths: `text/plain`, `America/Sao_Paulo`, `POST /notify`, `templates/<flow>/`, "
        "`instance/dev-secrets.json`, `bot.devtools.simulator`, `whatsapp:+14155238886`.",
        "```sh",
        "bin/nowhere --flag docs/also-gone.md",
        "```",
    ]))
    found = {(named, exists) for _, named, exists in named_paths(page, top_level_entries(), repository_file_names())}
    # Links resolve from the page's folder: from tmp_path, docs/configuration.md is not there.
    assert found == {
        ("docs/configuration.md", False), ("docs/gone.md", False),
        ("bot/devmode.py", True), ("bench/throughput.py", True), ("tests/test_docs_paths.py", True),
        ("bot/nowhere.py", False), ("wsgi.py", True), ("missing_module.py", False), ("bot/channels/email/*", True),
    }
