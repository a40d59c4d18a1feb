"""The Alembic migrations build exactly the models' schema, and `flask db upgrade` is repeatable."""
from __future__ import annotations

import os
import pprint
import sqlite3
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask

import bot.models  # noqa: F401  (registers every table on db.metadata)
from bot.database import MIGRATIONS_DIR
from bot.extensions import db

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FLASK = Path(sys.executable).with_name("flask")

SECRETS = {
    "TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
    "TWILIO_AUTH_TOKEN": "migration-test-auth-token",
    "TWILIO_WHATSAPP_NUMBER": "whatsapp:+14155238886",
    "NOTIFY_API_TOKEN": "migration-test-api-token",
}


def head_revision() -> str:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS_DIR)
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_migrations_match_models(app: Flask) -> None:
    """The schema the `_schema` fixture built with flask_migrate.upgrade is the models' schema."""
    with app.app_context():
        with db.engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            diff = compare_metadata(context, db.metadata)
            current = context.get_current_revision()
    assert diff == [], "models and migrations differ:\n" + pprint.pformat(diff)
    assert current == head_revision()


def test_migrated_tables_are_the_model_tables(app: Flask) -> None:
    with app.app_context():
        tables = set(sa.inspect(db.engine).get_table_names())
    assert set(db.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_single_migration_head() -> None:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS_DIR)
    heads = ScriptDirectory.from_config(config).get_heads()
    assert len(heads) == 1, f"several migration heads, merge them: {heads}"


def flask_db_upgrade(tmp_path: Path, database: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(PROJECT_ROOT),
        "DATABASE_URL": f"sqlite:///{database}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        **SECRETS,
    }
    return subprocess.run(
        [str(FLASK), "--app", "wsgi", "db", "upgrade"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def sqlite_schema(database: Path) -> tuple[set[str], list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Table names, every schema object's SQL, and the alembic_version rows of a SQLite file."""
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        objects = sorted(connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"),
                         key=lambda row: (row[0], row[1]))
        versions = sorted(connection.execute("SELECT version_num FROM alembic_version")) if "alembic_version" in tables else []
    connection.close()
    return tables, objects, versions


def test_flask_db_upgrade_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    assert FLASK.exists(), f"no flask script next to {sys.executable}"
    database = tmp_path / "x.db"

    first = flask_db_upgrade(tmp_path, database)
    assert first.returncode == 0, first.stdout + first.stderr
    assert database.exists()

    tables, objects, versions = sqlite_schema(database)
    assert {"contacts", "messages", "status_events", "alembic_version"} <= tables
    assert tables == set(db.metadata.tables) | {"alembic_version"}
    assert versions == [(head_revision(),)]

    second = flask_db_upgrade(tmp_path, database)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running upgrade" not in second.stdout + second.stderr
    assert sqlite_schema(database) == (tables, objects, versions)
