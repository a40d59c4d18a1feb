"""GET /healthz: 200 when the database and the queue answer, 503 (without secrets) when one does not."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from bot import create_app
from bot.extensions import db
from bot.delivery.queue import huey

UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/none"
UNREACHABLE_POSTGRES_WITH_PASSWORD = "postgresql://user:s3cret@127.0.0.1:1/x"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
UNREACHABLE_REDIS_WITH_PASSWORD = "redis://:r3dispass@127.0.0.1:1/0"


def test_healthy(client, redis_url: str | None) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["queue"] == "ok"
    assert body["queue_backend"] == ("redis" if redis_url else "sqlite")


def test_healthz_needs_no_credentials(client) -> None:
    response = client.get("/healthz", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 200


@pytest.fixture
def broken_app(base_config: dict[str, Any]) -> Iterator[Any]:
    """Build an app whose database or queue is unreachable, then put the shared Huey back.

    `bot.delivery.queue.huey` is a module-level singleton that create_app rebinds; the app fixture of the
    next test rebinds it again, but a test that does not use that fixture must not inherit a queue
    pointing at a closed port.
    """
    saved = {name: getattr(huey, name) for name in ("name", "storage_class", "storage_kwargs", "storage", "queues", "immediate")}
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app({**base_config, "TESTING": True, **overrides})
        apps.append(app)
        return app

    yield build

    for app in apps:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
    for name, value in saved.items():
        setattr(huey, name, value)


@pytest.mark.parametrize("url", [UNREACHABLE_POSTGRES, UNREACHABLE_POSTGRES_WITH_PASSWORD])
def test_unreachable_database(broken_app, url: str, redis_url: str | None) -> None:
    app = broken_app(DATABASE_URL=url)
    response = app.test_client().get("/healthz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] != "ok"
    assert body["database"] != "ok"
    assert body["queue"] == "ok"
    assert body["queue_backend"] == ("redis" if redis_url else "sqlite")
    text = response.get_data(as_text=True)
    assert "s3cret" not in text
    assert "127.0.0.1:1" not in text


@pytest.mark.parametrize("url", [UNREACHABLE_REDIS, UNREACHABLE_REDIS_WITH_PASSWORD])
def test_unreachable_queue(broken_app, url: str) -> None:
    app = broken_app(REDIS_URL=url)
    response = app.test_client().get("/healthz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] != "ok"
    assert body["database"] == "ok"
    assert body["queue"] != "ok"
    assert body["queue_backend"] == "redis"
    text = response.get_data(as_text=True)
    assert "r3dispass" not in text
    assert "127.0.0.1:1" not in text


def test_both_unreachable(broken_app) -> None:
    app = broken_app(DATABASE_URL=UNREACHABLE_POSTGRES_WITH_PASSWORD, REDIS_URL=UNREACHABLE_REDIS)
    response = app.test_client().get("/healthz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] != "ok"
    assert body["queue"] != "ok"
    assert "s3cret" not in response.get_data(as_text=True)


def test_healthy_again_after_a_broken_app(client, redis_url: str | None) -> None:
    """Runs after the broken apps above: the shared queue is bound to the working backend again."""
    response = client.get("/healthz")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["queue"] == "ok"
    assert huey.storage_kwargs.get("url") != UNREACHABLE_REDIS
