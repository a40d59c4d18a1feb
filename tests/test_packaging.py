"""What the packaging promises: the huey it needs, a wheel that runs anywhere, servers without dev tools."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest

from bot.clock import utcnow
from bot.delivery.queue import huey
from bot.delivery.tasks import SEND_RETRIES
from tests.conftest import make_contact

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SECRETS = {
    "TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
    "TWILIO_AUTH_TOKEN": "auth-token-for-packaging-tests",
    "TWILIO_WHATSAPP_NUMBER": "whatsapp:+14155238886",
    "NOTIFY_API_TOKEN": "api-token-for-packaging-tests",
}
#: pip's words when it cannot reach an index for the build backend (setuptools) of an isolated build.
OFFLINE = re.compile(r"No matching distribution found for setuptools|Could not find a version that satisfies the "
                     r"requirement setuptools|NewConnectionError|Temporary failure in name resolution|"
                     r"Network is unreachable|Failed to establish a new connection")


def clean_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """A fresh process's environment: nothing of the developer's shell, the instance under tmp_path."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "INSTANCE_PATH": str(tmp_path / "instance"), **variables}


# --- huey: the send task's retries back off (huey >= 3.3) -------------------------------------------


def test_the_send_tasks_own_retries_wait_2_4_8_16_32_seconds(app, client, auth, twilio):
    """retry_backoff exists from huey 3.3; older huey accepts it and retries every 2 s."""
    with app.app_context():
        make_contact()
    twilio.fail_next(503, 20503, "Service Unavailable", times=100)
    response = client.post("/notify", json={"to": "+15551234567", "body": "back off"}, headers=auth)
    assert response.status_code == 202, response.get_json()

    waits: list[float] = []
    task = huey.dequeue()
    while task is not None:
        before = utcnow()
        huey.execute(task)  # Twilio answers 503: the task raises, huey schedules its retry
        after = utcnow()
        due = huey.read_schedule(after + timedelta(days=1))
        if not due:
            break
        [retry] = due
        # huey set eta = (the moment of the failure) + delay, the failure being within [before, after]
        # (and nearer `after`: the failure is the end of the task).
        waits.append((retry.eta - after).total_seconds())
        expected = timedelta(seconds=2 ** len(waits))
        assert retry.eta - after <= expected <= retry.eta - before, (
            f"retry {len(waits)} waits {waits[-1]:.1f} s, not {expected.seconds} s "
            f"(huey older than 3.3 ignores retry_backoff): {waits}")
        retry.eta = None  # due now, instead of sleeping through the backoff
        huey.enqueue(retry)
        task = huey.dequeue()
    assert [round(w) for w in waits] == [2 * 2 ** i for i in range(SEND_RETRIES)] == [2, 4, 8, 16, 32]
    assert len(twilio.requests) == SEND_RETRIES + 1


# --- the wheel --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` of a copy of the working tree (an in-tree build would write build/ here)."""
    source = tmp_path_factory.mktemp("source") / "project"
    shutil.copytree(PROJECT_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".ci-venv", "instance", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".env"))
    out = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
                            capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        if OFFLINE.search(result.stdout + result.stderr):
            pytest.skip("cannot build the wheel: pip could not download the build backend (setuptools), "
                        "no package index is reachable")
        pytest.fail(f"pip wheel failed:\n{result.stdout}\n{result.stderr}")
    [built] = out.glob("whatsapp_bot_server-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel unpacked, as it lands in site-packages."""
    target = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_the_wheel_carries_every_module_the_migrations_and_the_copy(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points_text = archive.read(entry_points).decode()
    modules = {p.relative_to(PROJECT_ROOT).as_posix() for top in ("bot", "flows")
               for p in (PROJECT_ROOT / top).rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(modules - names)
    assert not missing, f"add their packages to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert "wsgi.py" in names and "flows/__init__.py" in names
    versions = [n for n in names if re.fullmatch(r"bot/migrations/versions/[^/]+\.py", n)]
    assert len(versions) == len(list((PROJECT_ROOT / "bot/migrations/versions").glob("*.py"))) > 0
    for name in ("env.py", "alembic.ini", "script.py.mako", "README"):
        assert f"bot/migrations/{name}" in names
    copy = {"bot/templates/" + p.relative_to(PROJECT_ROOT / "templates").as_posix()
            for p in (PROJECT_ROOT / "templates").rglob("*.txt")}
    assert copy and copy <= names, sorted(copy - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert re.search(r"\[flask\.commands\]\s+chat = bot\.devtools\.chat:chat_command", entry_points_text)


def test_the_installed_wheel_finds_its_copy_and_migrations_from_any_directory(site: Path, tmp_path: Path) -> None:
    """A host that installs the wheel and runs elsewhere: no checkout, no templates/ in the working directory."""
    # A stray top-level `templates` folder in site-packages (another distribution's) is not ours.
    decoy = site / "templates" / "common"
    decoy.mkdir(parents=True)
    (decoy / "help.txt").write_text("DECOY\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = """if True:
        import json, os, sys
        os.environ["FLASK_RUN_FROM_CLI"] = "true"  # what the flask command sets: Flask-Migrate is bound
        import wsgi
        from bot.conversations import replies
        from flask_migrate import upgrade
        import sqlalchemy as sa
        from bot.extensions import db
        with wsgi.app.app_context():
            text = replies.render("common/help", {})
            upgrade()
            tables = sa.inspect(db.engine).get_table_names()
        print(json.dumps({
            "files": [wsgi.__file__, replies.__file__, sys.modules["flows"].__file__],
            "templates": str(replies.TEMPLATES_DIR),
            "text": text,
            "raw": replies.environment().get_template("common/help.txt").render(business="Acme"),
            "tables": tables,
            "devtools": sorted(m for m in sys.modules if m.split(".")[:2] == ["bot", "devtools"]),
        }))
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=60,
                            env=clean_env(tmp_path, PYTHONPATH=str(site), BOT_NAME="Acme Dental", **SECRETS))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    for file in seen["files"]:
        assert Path(file).is_relative_to(site), f"imported {file}, not the wheel's copy under {site}"
    assert seen["templates"] == str(site / "bot" / "templates")
    assert seen["text"].startswith("You are chatting with Acme Dental.") and "DECOY" not in seen["text"]
    assert seen["raw"].startswith("You are chatting with Acme.")
    assert {"contacts", "messages", "alembic_version"} <= set(seen["tables"])
    assert seen["devtools"] == []


# --- servers never import the dev tools; `flask chat` still works -------------------------------------


@pytest.mark.parametrize("variables", [SECRETS, {}], ids=["configured", "development-mode"])
def test_the_web_and_worker_entry_point_does_not_import_the_dev_tools(tmp_path: Path, variables: dict) -> None:
    """gunicorn wsgi:app and huey_consumer wsgi.huey import wsgi, which runs create_app(). Nor
    do they import Alembic (only `flask db`) or Twilio's REST client (only a send): every web
    process would carry 17 MB it never uses (bench/THROUGHPUT.md, RSS)."""
    code = ("import sys, wsgi; assert wsgi.app and wsgi.huey; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['bot', 'devtools'] "
            "or m.split('.')[0] in ('alembic', 'flask_migrate') or m.startswith('twilio.rest')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=clean_env(tmp_path, PYTHONPATH=str(PROJECT_ROOT), **variables))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


#: What only the worker runs: a web process that imported it would carry megabytes it never uses.
WORKER_ONLY = ("bot.delivery.sender", "bot.conversations.engine", "bot.channels.whatsapp.channel",
               "bot.channels.email.channel", "bot.delivery.rate_limit", "flows.diagram", "requests",
               "sendgrid", "limits", "cryptography.hazmat")


def test_the_web_imports_nothing_only_the_worker_runs_and_the_consumer_loads_it(tmp_path: Path) -> None:
    """gunicorn imports wsgi and never creates a consumer: none of WORKER_ONLY is loaded
    (bench/THROUGHPUT.md, "The web's hot path": RSS). huey_consumer creates one, and by then the
    sender has its channels, before any task runs."""
    code = ("import json, sys, wsgi\n"
            f"worker_only = {WORKER_ONLY!r}\n"
            "loaded = lambda: sorted(m for m in sys.modules if m.startswith(worker_only))\n"
            "web = loaded()\n"
            "wsgi.huey.create_consumer(workers=1)\n"
            "from bot.delivery import sender\n"
            "print(json.dumps({'web': web, 'worker': loaded(), 'channels': sorted(sender.CHANNELS)}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=clean_env(tmp_path, PYTHONPATH=str(PROJECT_ROOT), **SECRETS))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["web"] == []
    assert {"bot.delivery.sender", "bot.conversations.engine", "bot.channels.whatsapp.channel"} <= set(seen["worker"])
    assert seen["channels"] == ["email", "whatsapp"]


#: What only a rare route uses, loaded on its first use and never at start (bench/THROUGHPUT.md,
#: "Web memory"): the dashboard's CSRF check (Flask-WTF, WTForms, babel's formatting) and a
#: user's email address (email-validator, with the idna tables it loads).
RARE_ROUTE_ONLY = ("flask_wtf", "wtforms", "babel.support", "email_validator", "idna")


def test_the_web_loads_what_only_a_rare_route_uses_on_its_first_use(tmp_path: Path) -> None:
    """A web process starts without RARE_ROUTE_ONLY; the dashboard's sign-in form still carries
    its CSRF token, a POST without one is still refused, and a user's address is still checked
    and normalised, each loading its package then."""
    code = ("import json, sys, wsgi\n"
            f"rare = {RARE_ROUTE_ONLY!r}\n"
            "loaded = lambda: sorted({m.split('.')[0] for m in sys.modules if m.startswith(rare)})\n"
            "at_start = loaded()\n"
            "client = wsgi.app.test_client()\n"
            "form = client.get('/dashboard/sign-in').get_data(as_text=True)\n"
            "token = form.split('name=\"csrf_token\" value=\"')[1].split('\"')[0]\n"
            "refused = client.post('/dashboard/sign-out').status_code\n"
            "from bot.http.schemas import UserBody\n"
            "email = UserBody.model_validate({'email': 'Ada@Example.COM'}).email\n"
            "print(json.dumps({'at_start': at_start, 'token': len(token), 'refused': refused, 'email': email,\n"
            "                  'after': loaded()}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=clean_env(tmp_path, PYTHONPATH=str(PROJECT_ROOT), SECRET_KEY="s" * 32, **SECRETS))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["at_start"] == []
    assert seen["token"] > 20 and seen["refused"] == 400 and seen["email"] == "ada@example.com"
    assert seen["after"] == ["babel", "email_validator", "flask_wtf", "idna", "wtforms"]


def test_the_web_loads_prometheus_client_only_when_metrics_are_on_and_its_exposition_on_a_scrape(
        tmp_path: Path) -> None:
    """Without METRICS_TOKEN nothing is timed or counted, so a process never imports
    prometheus_client; with it, the request histogram needs the client, and the exposition (the
    collectors, the readings' queries) waits for the first scrape (bench/THROUGHPUT.md, "The
    web's hot path", fourth pass)."""
    code = ("import sys, wsgi\n"
            "print(sorted(m for m in ('prometheus_client', 'bot.metrics.exposition') if m in sys.modules))\n")
    seen = {}
    for name, extra in (("off", {}), ("on", {"METRICS_TOKEN": "m" * 32})):
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, env=clean_env(tmp_path, PYTHONPATH=str(PROJECT_ROOT), **SECRETS, **extra))
        assert result.returncode == 0, result.stderr
        seen[name] = result.stdout.strip().splitlines()[-1]
    assert seen == {"off": "[]", "on": "['prometheus_client']"}


@pytest.mark.parametrize("where", ["project", "elsewhere"])
def test_flask_chat_is_found_by_the_flask_command(tmp_path: Path, where: str) -> None:
    """bin/chat runs `.venv/bin/flask --app wsgi chat`: the entry point of the installed project."""
    flask = Path(sys.executable).parent / "flask"
    if not flask.exists():
        pytest.skip(f"no flask console script beside {sys.executable}")
    cwd = PROJECT_ROOT if where == "project" else tmp_path
    result = subprocess.run([str(flask), "--app", "wsgi", "chat", "--help"], cwd=cwd, capture_output=True,
                            text=True, timeout=60, env=clean_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Usage: flask chat" in result.stdout and "WhatsApp user" in result.stdout
    assert "--as" in result.stdout and "--name" in result.stdout, (
        "no `chat` command: is the project installed (pip install -e .)? It registers through pyproject's "
        '[project.entry-points."flask.commands"]')


# --- the Procfile and the settings agree on the worker's concurrency ---------------------------------


def test_the_procfile_worker_threads_default_is_the_settings_default() -> None:
    """WORKER_THREADS is read twice, by huey_consumer (the Procfile) and by the app (settings):
    unset, both must mean the same number."""
    from bot.config import WORKER_THREADS_DEFAULT, load_settings

    worker_line = next(line for line in (PROJECT_ROOT / "Procfile").read_text().splitlines()
                       if line.startswith("worker:"))
    match = re.search(r"--workers \$\{WORKER_THREADS:-(\d+)\}", worker_line)
    assert match, worker_line
    assert int(match.group(1)) == WORKER_THREADS_DEFAULT
    assert load_settings({}, env_file=None).worker_threads == WORKER_THREADS_DEFAULT


def test_a_stopping_worker_and_web_fit_in_the_hosts_grace() -> None:
    """Heroku sends SIGTERM on every deploy and SIGKILL 30 s later. huey stops at once on SIGTERM
    unless told it is the graceful signal; then it waits --shutdown-timeout for sends in flight,
    which must fit the slowest send the settings allow (connect + read, each up to TWILIO_TIMEOUT)
    and the retries of its commit. gunicorn's graceful timeout fits the same 30 s."""
    from bot.config import Settings
    from bot.delivery import sender

    lines = dict(line.split(":", 1) for line in (PROJECT_ROOT / "Procfile").read_text().splitlines() if ":" in line)
    assert "--graceful-signal TERM" in lines["worker"]
    shutdown = int(re.search(r"--shutdown-timeout (\d+)", lines["worker"]).group(1))
    longest_timeout = next(m.le for m in Settings.model_fields["twilio_timeout"].metadata if hasattr(m, "le"))
    record_retries = sum(0.25 * 2 ** attempt for attempt in range(sender.RECORD_RETRIES))
    assert 2 * longest_timeout + record_retries <= shutdown < 30
    graceful = int(re.search(r"--graceful-timeout (\d+)", lines["web"]).group(1))
    assert graceful < 30


def test_sends_in_flight_share_the_keep_alive_pool_to_twilio(app) -> None:
    """One keep-alive connection per sending thread (SEND_CONCURRENCY): the SDK's own client keeps
    at most 32 (https only), and every thread beyond would open a new one."""
    from bot.channels.whatsapp.client import get_client

    with app.app_context():
        app.config["SEND_CONCURRENCY"] = 48
        app.extensions["twilio_client"] = None
        http_client = get_client().http_client
        for url in ("https://api.twilio.com/2010-04-01", "http://127.0.0.1:8080/2010-04-01"):  # http: a simulator
            manager = http_client._route(url, ("", url, None))
            assert manager.connection_from_url(url).pool.maxsize == 48
